//! Criterion benchmarks, the Rust half of the side-by-side comparison with PyTorch + PEFT
//! (`scripts/bench_peft.py` runs the same shapes). `scripts/bench.sh` runs both and writes
//! `BENCHMARKS.md`; run this half alone with
//!
//! ```text
//! cargo bench --bench lora                       # every case
//! cargo bench --bench lora -- forward/d768       # a filter
//! ```
//!
//! Cases (CPU, f32, r = 8 unless said; candle uses `RAYON_NUM_THREADS` threads, 2 in the script):
//!
//! - `forward/d768`, `forward/d4096`: a 768 x 768 linear layer with bias on 8 x 128 tokens and a
//!   4096 x 4096 one on 256 tokens: the base `candle_nn::Linear`, the unmerged `LoraLinear` and
//!   the merged one.
//! - `merge/d4096`: `LoraLinear::merge` of a 4096 x 4096 layer, beside the `[4096, r] x [r, 4096]`
//!   product that is its arithmetic floor.
//! - `train_step/gpt4_d768`: forward, backward and AdamW step of a 4-layer d = 768 GPT-style
//!   model on 8 x 128 tokens, with LoRA on `q_proj` and `v_proj` and with full fine-tuning.
//! - `adapter_io/l32_d4096`: `save_adapter` / `load_adapter` of a 32-layer, d = 4096 q/v adapter;
//!   `adapter_io/l8_d2048`: the first load onto a fresh model (hashing the bases) beside one read
//!   of the base weights.
//! - `merge_file/...`: `lora merge` of the model in `$LORA_BENCH_MERGE_DIR` (`model.safetensors`
//!   plus `adapter/`, written by `scripts/bench_peft.py gen-merge`), beside the I/O floor (read the
//!   input, write and sync an output of the same size). Skipped when the variable is unset.
//! - `mixed_batch/t1`, `mixed_batch/t16`: a 768 x 768 layer holding 1, 4, 16 or 64 named
//!   adapters and a batch of 64 rows (1 or 16 tokens each), row `i` with adapter `i mod n`:
//!   the base `candle_nn::Linear` alone (`base`), `forward_with_adapters` in one pass
//!   (`one_pass`; `one_pass_preset` with the routing set
//!   beforehand by `set_batch_adapters`), against the per-adapter sub-batch loop done with the
//!   public API, in two forms: PEFT's algorithm (`loop_delta`: the base on the whole batch, then
//!   per adapter gather its rows, LoRA term, `index_add` back) and a layer per adapter
//!   (`loop_layers`: gather the rows, full forward, `cat`, restore the row order).
//! - `smollm2_train/135m`: the SmolLM2-135M LoRA step `lora train` runs (skipped without the
//!   model); `lm_loss/smollm2_b1024`: its LM head and loss, fused and not.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use criterion::{criterion_group, BatchSize, BenchmarkId, Criterion};
use lora::prelude::*;
use lora::{LoraLayer, DEFAULT_ADAPTER};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RANK: usize = 8;
const ALPHA: f64 = 16.0;

fn randn(shape: &[usize], std: f32, rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let normal = rand_distr::Normal::new(0f32, std).unwrap();
    let v: Vec<f32> = (0..n).map(|_| rng.sample(normal)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A `d_in -> d_out` layer with bias and, when `adapter`, a rank-r adapter with non-zero `B`.
fn lora_layer(d_in: usize, d_out: usize, adapter: bool, rng: &mut StdRng) -> LoraLinear {
    let w = randn(&[d_out, d_in], 0.02, rng);
    let b = randn(&[d_out], 0.02, rng);
    let mut l = LoraLinear::from(Linear::new(w, Some(b)));
    if adapter {
        let options = InitOptions::default()
            .with_config(LayerConfig::new(RANK, ALPHA))
            .with_seed(7);
        l.init_adapter_with(&VarMap::new(), &options).unwrap();
        l.adapter()
            .unwrap()
            .b()
            .set(&randn(&[d_out, RANK], 0.02, rng))
            .unwrap();
    }
    l
}

fn forward(c: &mut Criterion) {
    // (name, features, token shape)
    for (name, d, tokens) in [("d768", 768, vec![8, 128]), ("d4096", 4096, vec![1, 256])] {
        let mut rng = StdRng::seed_from_u64(1);
        let mut shape = tokens.clone();
        shape.push(d);
        let x = randn(&shape, 1.0, &mut rng);
        let unmerged = lora_layer(d, d, true, &mut rng);
        let base = Linear::new(unmerged.weight().unwrap().clone(), unmerged.bias().cloned());
        let mut merged = unmerged.clone();
        merged.merge().unwrap();
        // The general (unfused) path, which a layer whose base weight needs a gradient takes:
        // base matmul, then the LoRA product into a temporary, then an add.
        let mut unfused = LoraLinear::new_unfrozen(base.clone());
        let adapter = unmerged.adapter().cloned().unwrap();
        unfused.insert_adapter(DEFAULT_ADAPTER, adapter).unwrap();
        let mut g = c.benchmark_group(format!("forward/{name}"));
        if d > 1024 {
            g.sample_size(20);
        }
        g.bench_function("base", |b| b.iter(|| base.forward(&x).unwrap()));
        g.bench_function("unmerged", |b| b.iter(|| unmerged.forward(&x).unwrap()));
        g.bench_function("merged", |b| b.iter(|| merged.forward(&x).unwrap()));
        g.finish();
        let rounds = if d > 1024 { 15 } else { 40 };
        interleaved(
            &format!("forward_{name}"),
            rounds,
            &mut [
                ("base", &mut || drop(base.forward(&x).unwrap())),
                ("unmerged", &mut || drop(unmerged.forward(&x).unwrap())),
                ("merged", &mut || drop(merged.forward(&x).unwrap())),
                ("unfused", &mut || drop(unfused.forward(&x).unwrap())),
            ],
        );
    }
}

/// Runs the cases in turn, `rounds` times (rotating which goes first), and writes each case's
/// median to the notes as `<prefix>_<case>_ns`: on a shared machine a burst of load then hits all
/// cases alike, so the ratios between them hold even when the absolute times do not.
fn interleaved(prefix: &str, rounds: usize, cases: &mut [(&str, &mut dyn FnMut())]) {
    let mut times = vec![Vec::with_capacity(rounds); cases.len()];
    for round in 0..=rounds {
        for i in 0..cases.len() {
            let k = (i + round) % cases.len();
            let start = std::time::Instant::now();
            (cases[k].1)();
            // Round 0 is a warm-up.
            if round > 0 {
                times[k].push(start.elapsed().as_nanos() as usize);
            }
        }
    }
    for ((name, _), mut t) in cases.iter().zip(times) {
        t.sort_unstable();
        write_note(&format!("{prefix}_{name}_ns"), t[t.len() / 2]);
    }
}

fn merge(c: &mut Criterion) {
    let d = 4096;
    let mut rng = StdRng::seed_from_u64(2);
    let mut layer = lora_layer(d, d, true, &mut rng);
    let ad = layer.adapter().unwrap().clone();
    let (a, b) = (ad.a().as_tensor().clone(), ad.b().as_tensor().clone());
    let mut g = c.benchmark_group("merge/d4096");
    g.sample_size(20);
    g.bench_function("rank_product", |bch| bch.iter(|| b.matmul(&a).unwrap()));
    g.bench_function("merge", |bch| {
        bch.iter(|| {
            layer.merge().unwrap();
            // A pointer swap: restores the original weight without arithmetic.
            layer.unmerge().unwrap();
        })
    });
    g.finish();
    let general = layer.clone();
    interleaved(
        "merge_d4096",
        20,
        &mut [
            ("rank_product", &mut || drop(b.matmul(&a).unwrap())),
            ("merge", &mut || {
                layer.merge().unwrap();
                layer.unmerge().unwrap();
            }),
            // The general path merge() takes off the CPU or for other dtypes: the delta as a
            // tensor, the add, the finite check as a reduction.
            ("general_path", &mut || {
                let merged = (general.weight().unwrap() + general.delta_weight().unwrap()).unwrap();
                let _finite = merged
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .is_finite();
            }),
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The training-step model: the GPT-style decoder of `examples/finetune/`, at d = 768.
// ---------------------------------------------------------------------------------------------

#[allow(dead_code)] // `build`, `init_seeded_adapter` and `Gpt::forward` serve the example only
#[path = "../examples/finetune/model.rs"]
mod model;

use model::{Gpt, GptConfig, Mode};

/// The shapes `scripts/bench_peft.py` uses too.
const GPT: GptConfig = GptConfig {
    vocab: 256,
    ctx: 128,
    d_model: 768,
    n_layer: 4,
    n_head: 12,
};
const BATCH: usize = 8;

/// Optimizer-state bytes of AdamW over `vars`: two f32 moments per parameter.
fn adamw_state_bytes(vars: &[Var]) -> usize {
    2 * 4 * vars.iter().map(|v| v.elem_count()).sum::<usize>()
}

fn train_step(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let ids: Vec<u32> = (0..BATCH * GPT.ctx)
        .map(|_| rng.random_range(0..GPT.vocab as u32))
        .collect();
    let ids = Tensor::from_vec(ids, (BATCH, GPT.ctx), &Device::Cpu).unwrap();
    let targets = ids.flatten_all().unwrap();
    let params = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut g = c.benchmark_group("train_step/gpt4_d768");
    g.sample_size(10);
    for (name, mode) in [("lora", Mode::Lora), ("full", Mode::Full)] {
        let varmap = VarMap::new();
        let mut model = Gpt::new(
            &GPT,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            mode,
        )
        .unwrap();
        let vars = match mode {
            Mode::Full => varmap.all_vars(),
            Mode::Lora => {
                let adapters = VarMap::new();
                model.init_adapter(&adapters).unwrap();
                model.set_training(true);
                model.trainable_vars()
            }
        };
        eprintln!(
            "train_step/{name}: {} trainable parameters, AdamW state {} bytes",
            vars.iter().map(|v| v.elem_count()).sum::<usize>(),
            adamw_state_bytes(&vars)
        );
        write_note(
            &format!("train_step_{name}_optimizer_state_bytes"),
            adamw_state_bytes(&vars),
        );
        let mut opt = candle_nn::AdamW::new(vars, params.clone()).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let logits = model.forward(&ids).unwrap();
                let loss = candle_nn::loss::cross_entropy(&logits.flatten_to(1).unwrap(), &targets)
                    .unwrap();
                opt.backward_step(&loss).unwrap();
            })
        });
    }
    g.finish();
}

/// Writes a number the report reads next to criterion's timings (`target/criterion/notes/`).
fn write_note(name: &str, value: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion/notes");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(name), value.to_string());
}

// ---------------------------------------------------------------------------------------------
// Adapter files.
// ---------------------------------------------------------------------------------------------

#[lora(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"])]
struct QvLayer {
    q_proj: Linear,
    v_proj: Linear,
}

#[lora]
struct QvModel {
    #[lora(nested)]
    layers: Vec<QvLayer>,
}

fn adapter_io(c: &mut Criterion) {
    let (n_layer, d) = (32, 4096);
    // The adapter needs only the layers' shapes: a broadcast zero stands in for each 64 MB weight.
    let zero = Tensor::zeros((1, 1), DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_as((d, d))
        .unwrap();
    let layer = || QvLayer {
        q_proj: Linear::new(zero.clone(), None).into(),
        v_proj: Linear::new(zero.clone(), None).into(),
    };
    let mut model = QvModel {
        layers: (0..n_layer).map(|_| layer()).collect(),
    };
    model.init_adapter(&VarMap::new()).unwrap();
    let dir = bench_dir().join("adapter_io");
    model.save_adapter(&dir).unwrap();
    let mut g = c.benchmark_group("adapter_io/l32_d4096");
    g.sample_size(20);
    g.bench_function("save", |b| b.iter(|| model.save_adapter(&dir).unwrap()));
    g.bench_function("load", |b| b.iter(|| model.load_adapter(&dir).unwrap()));
    g.finish();

    // The first load onto a fresh model must hash every target's base weight once (its
    // fingerprint is then kept): beside it, one plain read of those weights (a sum of each).
    // Real random weights here, 8 layers of d = 2048 (q and v: 256 MiB).
    let (n_layer, d) = (8, 2048);
    let mut rng = StdRng::seed_from_u64(9);
    let weights: Vec<(Tensor, Tensor)> = (0..n_layer)
        .map(|_| {
            (
                randn(&[d, d], 0.02, &mut rng),
                randn(&[d, d], 0.02, &mut rng),
            )
        })
        .collect();
    let fresh = || QvModel {
        layers: weights
            .iter()
            .map(|(q, v)| QvLayer {
                q_proj: Linear::new(q.clone(), None).into(),
                v_proj: Linear::new(v.clone(), None).into(),
            })
            .collect(),
    };
    let mut model = fresh();
    model.init_adapter(&VarMap::new()).unwrap();
    let dir = bench_dir().join("adapter_io_first");
    model.save_adapter(&dir).unwrap();
    let mut g = c.benchmark_group("adapter_io/l8_d2048");
    g.sample_size(10);
    g.bench_function("first_load", |b| {
        b.iter_batched(
            fresh,
            |mut m| m.load_adapter(&dir).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.bench_function("read_weights", |b| {
        b.iter(|| {
            for (q, v) in &weights {
                drop(q.sum_all().unwrap());
                drop(v.sum_all().unwrap());
            }
        })
    });
    g.finish();
}

fn bench_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// `lora merge` of a whole safetensors model.
// ---------------------------------------------------------------------------------------------

/// Maps `input` and writes its bytes to `out`, synced: what any merge must at least do (the floor
/// `merge_file/model/merge` is compared with; `lora merge` reads its input the same way).
fn copy_floor(input: &Path, out: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(input)?;
    // SAFETY: a read-only mapping of a file nothing else writes during the benchmark.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let mut f = std::fs::File::create(out)?;
    f.write_all(&map)?;
    f.sync_all()
}

fn merge_file(c: &mut Criterion) {
    let Some(dir) = std::env::var_os("LORA_BENCH_MERGE_DIR").map(PathBuf::from) else {
        eprintln!(
            "merge_file: LORA_BENCH_MERGE_DIR is not set, skipped (scripts/bench.sh sets it)"
        );
        return;
    };
    let (base, adapter) = (dir.join("model.safetensors"), dir.join("adapter"));
    let out = dir.join("merged-bench.safetensors");
    let mut g = c.benchmark_group("merge_file/model");
    g.sample_size(10);
    g.bench_function(BenchmarkId::from_parameter("io_floor"), |b| {
        b.iter(|| copy_floor(&base, &out).unwrap())
    });
    g.bench_function(BenchmarkId::from_parameter("merge"), |b| {
        b.iter(|| {
            lora::merge_file::merge_safetensors(&base, &adapter, &out, &mut |_, _| {}).unwrap()
        })
    });
    g.finish();
    let _ = std::fs::remove_file(&out);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

// ---------------------------------------------------------------------------------------------
// Mixed-adapter batches.
// ---------------------------------------------------------------------------------------------

#[lora(rank = 8, alpha = 16, targets = ["proj"])]
struct OneLayer {
    proj: Linear,
}

/// The rows of each adapter of `rows` (`names[k]` gets `groups[k]`), as `u32` row indices.
fn group_rows(rows: &[Option<&str>], names: &[String]) -> Vec<Vec<u32>> {
    let mut groups = vec![Vec::new(); names.len()];
    for (i, row) in rows.iter().enumerate() {
        let name = row.expect("every benchmark row has an adapter");
        let k = names.iter().position(|n| n == name).unwrap();
        groups[k].push(i as u32);
    }
    groups
}

/// PEFT's `_mixed_batch_forward` with our API: the base on the whole batch, then for each
/// adapter gather its rows, compute `s (x A^T) B^T` and add it back at those rows.
fn sub_batch_delta(
    layer: &LoraLinear,
    base: &Linear,
    x: &Tensor,
    rows: &[Option<&str>],
    names: &[String],
) -> Tensor {
    let mut y = base.forward(x).unwrap();
    let inp = x.dim(D::Minus1).unwrap();
    for (k, idx) in group_rows(rows, names).into_iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let ad = layer.adapter_named(&names[k]).unwrap();
        let n = idx.len();
        let ids = Tensor::from_vec(idx, n, x.device()).unwrap();
        let xs = x.index_select(&ids, 0).unwrap();
        let mut dims = xs.dims().to_vec();
        let xs2 = xs.reshape((xs.elem_count() / inp, inp)).unwrap();
        let h = xs2
            .matmul(&ad.a().as_tensor().t().unwrap())
            .unwrap()
            .affine(ad.scaling(), 0.0)
            .unwrap();
        let d = h.matmul(&ad.b().as_tensor().t().unwrap()).unwrap();
        *dims.last_mut().unwrap() = d.dim(1).unwrap();
        y = y.index_add(&ids, &d.reshape(dims).unwrap(), 0).unwrap();
    }
    y
}

/// The loop with a layer per adapter (`layers[k]` has `names[k]` active): gather each adapter's
/// rows, run the whole layer on them, concatenate, and put the rows back in their order.
fn sub_batch_layers(
    layers: &[LoraLinear],
    x: &Tensor,
    rows: &[Option<&str>],
    names: &[String],
) -> Tensor {
    let mut outs = Vec::with_capacity(layers.len());
    let mut order = Vec::with_capacity(rows.len());
    for (k, idx) in group_rows(rows, names).into_iter().enumerate() {
        if idx.is_empty() {
            continue;
        }
        let ids = Tensor::from_vec(idx.clone(), idx.len(), x.device()).unwrap();
        outs.push(
            layers[k]
                .forward(&x.index_select(&ids, 0).unwrap())
                .unwrap(),
        );
        order.extend(idx);
    }
    let mut inverse = vec![0u32; order.len()];
    for (j, &i) in order.iter().enumerate() {
        inverse[i as usize] = j as u32;
    }
    let n = inverse.len();
    Tensor::cat(&outs, 0)
        .unwrap()
        .index_select(&Tensor::from_vec(inverse, n, x.device()).unwrap(), 0)
        .unwrap()
}

fn mixed_batch(c: &mut Criterion) {
    let (d, batch) = (768, 64);
    // Under `--profile-time` only the criterion case being profiled runs.
    let profiling = std::env::args().any(|a| a == "--profile-time");
    for tokens in [1, 16] {
        let mut g = c.benchmark_group(format!("mixed_batch/t{tokens}"));
        g.warm_up_time(Duration::from_millis(300));
        g.measurement_time(Duration::from_millis(1500));
        g.sample_size(20);
        for n in [1, 4, 16, 64] {
            let mut rng = StdRng::seed_from_u64(6);
            let w = randn(&[d, d], 0.02, &mut rng);
            let bias = randn(&[d], 0.02, &mut rng);
            let base = Linear::new(w.clone(), Some(bias.clone()));
            let mut m = OneLayer {
                proj: Linear::new(w, Some(bias)).into(),
            };
            let vm = VarMap::new();
            let names: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
            for name in &names {
                m.init_adapter_with(&vm, &InitOptions::default().with_name(name.as_str()))
                    .unwrap();
                let b = randn(&[d, RANK], 0.02, &mut rng);
                m.proj.adapter_named(name).unwrap().b().set(&b).unwrap();
            }
            // A layer per adapter, that adapter active (clones share the weights).
            let layers: Vec<LoraLinear> = names
                .iter()
                .map(|name| {
                    m.set_active_adapter(Some(name)).unwrap();
                    m.proj.clone()
                })
                .collect();
            m.set_active_adapter(None).unwrap();
            let rows: Vec<Option<&str>> = (0..batch).map(|i| Some(names[i % n].as_str())).collect();
            let x = if tokens == 1 {
                randn(&[batch, d], 1.0, &mut rng)
            } else {
                randn(&[batch, tokens, d], 1.0, &mut rng)
            };
            let layer = &m.proj;
            let one = layer.forward_with_adapters(&x, &rows).unwrap();
            // The routing set once on the model, as a server would per batch.
            let mut pm = OneLayer {
                proj: m.proj.clone(),
            };
            pm.set_batch_adapters(Some(&rows)).unwrap();
            let preset = pm.proj.clone();
            // A serving loop: a new assignment every step, routing kept on (stacks reused).
            let mut reassign = || {
                pm.set_batch_adapters(Some(&rows)).unwrap();
                pm.proj.forward(&x).unwrap()
            };
            for other in [
                sub_batch_delta(layer, &base, &x, &rows, &names),
                sub_batch_layers(&layers, &x, &rows, &names),
                preset.forward(&x).unwrap(),
            ] {
                let diff = (&one - &other)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-4, "mixed_batch t{tokens} n{n}: {diff}");
            }
            g.bench_function(BenchmarkId::new("base", n), |b| {
                b.iter(|| base.forward(&x).unwrap())
            });
            g.bench_function(BenchmarkId::new("one_pass", n), |b| {
                b.iter(|| layer.forward_with_adapters(&x, &rows).unwrap())
            });
            g.bench_function(BenchmarkId::new("one_pass_preset", n), |b| {
                b.iter(|| preset.forward(&x).unwrap())
            });
            g.bench_function(BenchmarkId::new("one_pass_reassign", n), |b| {
                b.iter(&mut reassign)
            });
            g.bench_function(BenchmarkId::new("loop_delta", n), |b| {
                b.iter(|| sub_batch_delta(layer, &base, &x, &rows, &names))
            });
            g.bench_function(BenchmarkId::new("loop_layers", n), |b| {
                b.iter(|| sub_batch_layers(&layers, &x, &rows, &names))
            });
            if profiling {
                continue;
            }
            interleaved(
                &format!("mixed_batch_t{tokens}_n{n}"),
                if tokens == 1 { 200 } else { 40 },
                &mut [
                    ("base", &mut || drop(base.forward(&x).unwrap())),
                    ("one_pass", &mut || {
                        drop(layer.forward_with_adapters(&x, &rows).unwrap())
                    }),
                    ("one_pass_preset", &mut || drop(preset.forward(&x).unwrap())),
                    ("one_pass_reassign", &mut || drop(reassign())),
                    ("loop_delta", &mut || {
                        drop(sub_batch_delta(layer, &base, &x, &rows, &names))
                    }),
                    ("loop_layers", &mut || {
                        drop(sub_batch_layers(&layers, &x, &rows, &names))
                    }),
                ],
            );
        }
        g.finish();
    }
}

/// A LoRA (q, v; r = 8, alpha = 16) training step of SmolLM2-135M-Instruct (the GGUF dequantized to
/// f32), batch 8 x 128 tokens, loss on every token: the step `lora train` runs (the SFT loss of
/// `lora::models::sft`, `lora::train::Trainer`'s AdamW). `scripts/bench_train.py` compares the
/// whole command with PyTorch + PEFT. Skipped without the model (`scripts/fetch-smollm2.sh`).
fn smollm2_train_step(c: &mut Criterion) {
    use lora::models::sft::{self, Batch, Example};
    use lora::train::{Trainer, TrainerConfig};
    let Some(path) = lora::models::cache::smollm2() else {
        eprintln!("smollm2_train_step: skipped: run scripts/fetch-smollm2.sh");
        return;
    };
    let mut model = lora::models::llama::load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let config = LoraConfig::from_json(
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    model
        .init_adapter_with(
            &VarMap::new(),
            &InitOptions::default().with_peft_config(config),
        )
        .unwrap();
    model.set_training(true);
    let (batch, len) = (8, 128);
    let mut rng = StdRng::seed_from_u64(5);
    let examples: Vec<Example> = (0..batch)
        .map(|row| Example {
            ids: (0..=len).map(|_| rng.random_range(0..49152u32)).collect(),
            targets: (0..=len).map(|i| i > 0).collect(),
            line: row + 1,
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::new(&refs, 2, &Device::Cpu).unwrap();
    let config = TrainerConfig {
        lr: 1e-4,
        total_steps: 1 << 20,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model.named_trainable_vars(), config).unwrap();
    let mut g = c.benchmark_group("smollm2_train/135m");
    g.sample_size(10);
    g.bench_function("lora_qv_b8x128", |b| {
        b.iter(|| {
            let loss = (sft::loss_sum(&model, &batch).unwrap() / batch.loss_tokens as f64).unwrap();
            trainer.backward(&loss).unwrap();
            trainer.step().unwrap();
        })
    });
    g.finish();
}

/// The LM head and the summed cross-entropy of SmolLM2-135M's shapes (1024 tokens, hidden 576,
/// vocabulary 49152), forward and backward to the hidden states: the fused op
/// (`ops::linear_cross_entropy_sum`, logits a chunk of rows at a time) against the head's
/// matmul followed by the fused cross-entropy (`[1024, 49152]` logits and their gradient).
fn lm_loss(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, d, vocab) = (1024, 576, 49152);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1., (n, d), &dev).unwrap()).unwrap();
    let w = (Tensor::randn(0f32, 1., (vocab, d), &dev).unwrap() * 0.05).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let labels = Tensor::from_vec(ids, n, &dev).unwrap();
    let mut g = c.benchmark_group("lm_loss/smollm2_b1024");
    g.sample_size(10);
    g.bench_function("fused", |b| {
        b.iter(|| {
            let loss = lora::ops::linear_cross_entropy_sum(h.as_tensor(), &w, &labels).unwrap();
            loss.backward().unwrap()
        })
    });
    g.bench_function("head_then_loss", |b| {
        b.iter(|| {
            let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let loss = lora::ops::cross_entropy_sum(&logits, &labels).unwrap();
            loss.backward().unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = forward, merge, train_step, adapter_io, merge_file, mixed_batch, smollm2_train_step, lm_loss
}
fn main() {
    // What `lora train` and the examples do first: the training steps compute on this thread.
    lora::train::prepare_training_process();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
