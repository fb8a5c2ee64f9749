//! The run settings of the SmolLM2 examples and one configuration's training run: the library's
//! loop with the example's schedule.

use std::path::{Path, PathBuf};
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

/// The settings both SmolLM2 examples take (flattened into their arguments).
#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// Optimizer steps for each configuration.
    #[arg(long, default_value_t = 40)]
    pub(crate) steps: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    pub(crate) batch_size: usize,
    /// Held-out examples for the metrics.
    #[arg(long, default_value_t = 48)]
    pub(crate) held_out: usize,
    /// Seed of the data, the adapters and the shuffling.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// A tiny configuration (a few steps, a few examples) for the test suite.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Where the outputs and the data go (default target/lora-example/<example>).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

impl RunArgs {
    /// `(steps, batch size, held-out examples)`: with `--quick`, `quick_steps` steps of 2
    /// examples and 4 held out.
    pub(crate) fn sizes(&self, quick_steps: u64) -> (u64, usize, usize) {
        if self.quick {
            (quick_steps, 2, 4)
        } else {
            (self.steps, self.batch_size, self.held_out)
        }
    }

    /// `--out`, or `target/lora-example/<example>`, created.
    pub(crate) fn out_dir(&self, example: &str) -> std::io::Result<PathBuf> {
        let out = self.out.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target/lora-example")
                .join(example)
        });
        std::fs::create_dir_all(&out)?;
        Ok(out)
    }
}
