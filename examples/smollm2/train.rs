//! One configuration's training run: the library's loop with the example's schedule.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use lora::models::sft::{self, Dataset, Duration, Outcome, SftConfig, Tuning};
use lora::models::Pretrained;
use lora::train::TrainerConfig;

/// Trains `p`'s model (its active adapter, or every weight) on `data`: `steps` steps of
/// `batch_size` examples, AdamW at `lr` with 10% warmup and cosine decay, the output in `out`.
/// Returns the loop's outcome and the wall time in seconds.
pub(crate) fn run_config(
    p: &mut Pretrained,
    data: &Dataset,
    tuning: Tuning,
    lr: f64,
    (steps, batch_size, seed): (u64, usize, u64),
    out: &Path,
) -> Result<(Outcome, f64)> {
    let config = SftConfig {
        trainer: TrainerConfig {
            lr,
            warmup_steps: steps / 10,
            ..Default::default()
        },
        duration: Duration::Steps(steps),
        batch_size,
        seed,
        tuning,
        out: out.to_path_buf(),
        ..Default::default()
    };
    let start = Instant::now();
    let tokenizer = p.tokenizer.clone();
    let outcome = sft::train(
        &mut p.model,
        &tokenizer,
        data,
        None,
        &config,
        &AtomicBool::new(false),
        &mut |_| {},
    )?;
    Ok((outcome, start.elapsed().as_secs_f64()))
}
