//! Fine-tune a small GPT-style model with `#[lora]` on CPU, with full fine-tuning beside it.
//!
//! 1. Pre-trains a character-level decoder on a generated corpus of plain sentences (cached under
//!    `target/lora-example/`, `--retrain` to redo it).
//! 2. Adapts it to a new task in the spirit of the LoRA paper's E2E NLG experiment: turn a meaning
//!    representation (`name[Aromi] food[Thai] area[riverside]`) into a sentence. The held-out
//!    split uses restaurant names never seen in training.
//! 3. Runs the same adaptation with LoRA (rank r on `q_proj` and `v_proj`, as in the paper) and
//!    with full fine-tuning: same steps, same learning-rate search budget.
//! 4. Saves the adapter in PEFT format, loads it into a freshly built base model (identical
//!    outputs), merges it and times a merged forward against the base model's.
//!
//! This file is the story. The model is in `model.rs`, the data in `data.rs`, the training loop in
//! `train.rs`, pre-training and the two adaptations in `experiment.rs`, and the measuring (table,
//! memory, timing) in `report.rs`.
//!
//! ```text
//! cargo run --release --example finetune            # ~3 minutes on 2 cores
//! cargo run --release --example finetune -- --quick # a few seconds, tiny configuration
//! ```

mod data;
mod experiment;
mod model;
mod report;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use clap::Parser;
use lora::prelude::*;

use data::{batch, make_data, vocab_size, Batch, Sequence};
use experiment::Experiment;
use model::{Gpt, GptConfig, Mode};
use report::{count_params, human_bytes, interleaved_medians, Row};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a small GPT with #[lora] and with full fine-tuning, side by side")]
pub(crate) struct Args {
    /// Adaptation steps for each method (LoRA and full fine-tuning).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// LoRA rank (alpha = 2 * rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Seed for data, initialisation and sampling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// A tiny configuration that runs in seconds (used by the test suite).
    #[arg(long)]
    quick: bool,
    /// Where the PEFT adapter is written (default: target/lora-example/adapter).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pre-train the base model again instead of using the cached one.
    #[arg(long)]
    retrain: bool,
    /// Pre-training steps.
    #[arg(long, default_value_t = 500)]
    pretrain_steps: usize,
}

/// What the run measured, for the test that runs the example.
#[allow(dead_code)]
pub(crate) struct Summary {
    pub(crate) base_loss: f32,
    pub(crate) lora_loss: f32,
    pub(crate) full_loss: f32,
    pub(crate) adapter_bytes: u64,
    pub(crate) full_bytes: u64,
}

fn main() -> Result<()> {
    run(Args::parse()).map(|_| ())
}

pub(crate) fn run(args: Args) -> Result<Summary> {
    ensure!(args.rank >= 1, "--rank must be at least 1");
    let experiment = configure(&args)?;
    let cfg = experiment.cfg;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| experiment.work.join("adapter"));
    println!("LoRA fine-tuning example: GPT d_model={} layers={} heads={} vocab={}; LoRA r={} alpha={} on q_proj, v_proj", cfg.d_model, cfg.n_layer, cfg.n_head, cfg.vocab, args.rank, 2 * args.rank);

    // 1. Pre-train the base model (cached).
    let base_path = experiment.pretrained_base(args.retrain)?;

    // 2. The base model alone.
    let (base, base_vars) = experiment.build_on(&base_path, Mode::Lora)?;
    let total_params = count_params(&base_vars);
    let base_row = Row::base_only(total_params, experiment.held_out_scores(&base)?);

    // 3. The same adaptation with LoRA and with full fine-tuning: same steps; each searches two
    //    learning rates on a quarter of the steps, scored on a validation split.
    let lora = experiment.adapt(&base_path, Mode::Lora, total_params)?;
    let full = experiment.adapt(&base_path, Mode::Full, total_params)?;
    let full_path = experiment.work.join("full-finetune.safetensors");
    full.vars.save(&full_path)?;
    let mut lora_model = lora.model;

    // 4. The table.
    let rows = [base_row, lora.row, full.row];
    report::print_table(&rows, experiment.data.held_out.len());
    let counts = lora_model.trainable_parameters();
    println!(
        "{}",
        counts.with_frozen(total_params - (counts.total - counts.trainable))
    );

    // 5. Save in PEFT format, load into a fresh base, compare.
    lora_model.save_adapter(&out)?;
    let (adapter_bytes, full_bytes) = print_sizes(&out, &full_path)?;
    let (mut fresh, _) = experiment.build_on(&base_path, Mode::Lora)?;
    fresh.load_adapter(&out)?;
    let refs: Vec<&Sequence> = experiment.data.held_out.iter().take(16).collect();
    let probe = batch(&refs, cfg.ctx)?;
    check_identical(&lora_model, &fresh, &probe)?;

    // 6. Merge: same output, and a forward costs what the base model's does.
    let runs = if args.quick { 5 } else { 41 };
    merge_and_time(&mut lora_model, &base, &fresh, &probe, runs)?;
    Ok(Summary {
        base_loss: rows[0].scores.loss,
        lora_loss: rows[1].scores.loss,
        full_loss: rows[2].scores.loss,
        adapter_bytes,
        full_bytes,
    })
}

/// The sizes of a run (`--quick` shrinks them), its seed and data.
fn configure(args: &Args) -> Result<Experiment> {
    let (d_model, n_layer, n_head, steps, pretrain_steps, batch_size) = if args.quick {
        (32, 1, 2, args.steps.min(12), args.pretrain_steps.min(20), 8)
    } else {
        (64, 2, 4, args.steps, args.pretrain_steps, 12)
    };
    let work = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("lora-example");
    std::fs::create_dir_all(&work)?;
    Ok(Experiment {
        cfg: GptConfig {
            vocab: vocab_size(),
            ctx: 128,
            d_model,
            n_layer,
            n_head,
        },
        steps,
        pretrain_steps,
        batch_size,
        seed: args.seed,
        lora: LayerConfig::new(args.rank, 2.0 * args.rank as f64),
        work,
        data: make_data(args.seed, args.quick),
    })
}

/// Prints the adapter's size beside the full checkpoint's; returns both, in bytes.
fn print_sizes(adapter_dir: &Path, full_path: &Path) -> Result<(u64, u64)> {
    let adapter_path = adapter_dir.join("adapter_model.safetensors");
    let adapter_size = std::fs::metadata(&adapter_path)?.len();
    let full_size = std::fs::metadata(full_path)?.len();
    println!(
        "adapter: {} ({}) vs full checkpoint {} ({}): {:.1}x smaller",
        adapter_path.display(),
        human_bytes(adapter_size),
        full_path.display(),
        human_bytes(full_size),
        full_size as f64 / adapter_size as f64
    );
    Ok((adapter_size, full_size))
}

/// Checks that the reloaded adapter gives the trained model's outputs, bit for bit.
fn check_identical(trained: &Gpt, reloaded: &Gpt, probe: &Batch) -> Result<()> {
    let y_trained = trained.forward(&probe.inputs)?.flatten_all()?;
    let y_loaded = reloaded.forward(&probe.inputs)?.flatten_all()?;
    ensure!(
        y_trained.to_vec1::<f32>()? == y_loaded.to_vec1::<f32>()?,
        "the reloaded adapter must give identical outputs"
    );
    println!("reloaded the adapter into a freshly built base model: outputs bit-identical");
    Ok(())
}

/// Merges `model`, compares its outputs with the unmerged ones and times a forward of the base,
/// the merged and the `unmerged` model (the same adapter, reloaded).
fn merge_and_time(
    model: &mut Gpt,
    base: &Gpt,
    unmerged: &Gpt,
    probe: &Batch,
    runs: usize,
) -> Result<()> {
    let x = &probe.inputs;
    let y_unmerged = model.forward(x)?;
    model.merge()?;
    let y_merged = model.forward(x)?;
    let diff = (&y_merged - &y_unmerged)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = y_unmerged
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let [tb, tm, tu] = interleaved_medians(
        [
            &mut || {
                base.forward(x)?;
                Ok(())
            },
            &mut || {
                model.forward(x)?;
                Ok(())
            },
            &mut || {
                unmerged.forward(x)?;
                Ok(())
            },
        ],
        runs,
        3,
    )?;
    println!("merged: max |merged - unmerged| = {diff:.2e} (outputs up to {scale:.1})");
    println!(
        "forward of 16 sequences, median of {runs} x 3: base {:.2} ms, merged {:.2} ms ({:.3}x base), unmerged LoRA {:.2} ms ({:.3}x base)",
        tb * 1e3, tm * 1e3, tm / tb, tu * 1e3, tu / tb
    );
    Ok(())
}
