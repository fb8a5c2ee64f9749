//! Process settings for a training loop that computes on the calling thread.

/// Sets this process up for a training loop that runs on the calling thread (CPU). Call it
/// first in `main`, before anything uses candle, rayon or much memory; settings that can no
/// longer change (a thread pool already running) stay as they are. What it does:
///
/// - The calling thread becomes one of the threads of rayon's global pool (the pool gemm splits
///   candle's matmuls over), so a matmul shares its work with this thread instead of waking the
///   pool and sleeping until it is done.
/// - candle's element-wise ops run on the calling thread alone, unless `CANDLE_NUM_THREADS`
///   says otherwise: candle's own worker pool would spin beside gemm's threads on the same
///   cores (7% of the samples of a SmolLM2-135M LoRA step on 2 cores).
/// - On Linux with glibc, freed memory stays in the heap for the next step instead of going
///   back to the kernel (tensors up to 32 MiB come from the heap, which is never trimmed): a
///   step frees and reallocates every activation, and fresh zeroed pages cost ~50k page
///   faults a SmolLM2 step, 5% of its time; with this, none after the first step, at the same
///   peak RSS. The process keeps its peak memory until it exits.
///
/// `lora train` calls it. Measured together on SmolLM2-135M (LoRA q, v, batch 8 x 128, 2 threads,
/// 12 steps): 184-196 tokens/s without, 217-231 with (see BENCHMARKS.md).
pub fn prepare_training_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // candle reads it once, when its pool starts.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // An error means the global pool already runs: it keeps working as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under the allocator's own locks.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}
