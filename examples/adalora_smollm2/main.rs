//! AdaLoRA against LoRA r=8 on the main example's task (examples/smollm2/: SmolLM2-135M-Instruct,
//! generated E2E-style data-to-text, held-out restaurant names), with the same final budget of
//! singular values: LoRA r=8 on `q_proj`, `v_proj` (60 modules of rank 8: 480) against AdaLoRA
//! starting at `init_r` 12 on the same modules (720) and pruned during training to an average of
//! `target_r` 8 (480) (PEFT's schedule: warm-up `tinit`, cubic decay, final
//! `tfinal` steps at the final mask). Same data, steps, batch, learning rate and seed; the same
//! scaling (`alpha / r` = 2 for LoRA, `alpha / init_r` = 2 for AdaLoRA).
//!
//! Prints the held-out loss and exact match side by side and AdaLoRA's final rank pattern: which
//! layers got the budget.
//!
//! ```text
//! cargo run --release --example adalora_smollm2            # ~10 minutes on 2 cores
//! cargo run --release --example adalora_smollm2 -- --quick # a few steps
//! ```

#[path = "../smollm2/data.rs"]
mod data;
#[path = "../smollm2/score.rs"]
mod score;
#[path = "../smollm2/train.rs"]
mod train;

use anyhow::{Context, Result};
use clap::Parser;
use lora::candle::{DType, Device};
use lora::models::sft::{DataOptions, Dataset, Tuning};
use lora::models::Pretrained;
use lora::prelude::*;
use lora::train::RankPattern;

use score::held_out_scores;
use train::{run_config, RunArgs};

#[derive(Parser, Debug)]
#[command(about = "AdaLoRA vs LoRA r=8 on SmolLM2-135M-Instruct, the same final budget")]
pub(crate) struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Learning rate of LoRA (the main example's for LoRA q,v).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Learning rate of AdaLoRA (default: --lr).
    #[arg(long)]
    adalora_lr: Option<f64>,
    /// Train AdaLoRA alone (LoRA's row is left out).
    #[arg(long)]
    skip_lora: bool,
}

/// One configuration's results.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) lr: f64,
    /// Adapter parameters while training.
    pub(crate) trained: usize,
    /// Adapter parameters in the saved file.
    pub(crate) saved: usize,
    pub(crate) loss: f32,
    pub(crate) exact: f64,
    pub(crate) seconds: f64,
}

fn main() -> Result<()> {
    // Training computes on this thread: thread pools and allocator set up for it.
    lora::train::prepare_training_process();
    run(Args::parse()).map(|_| ())
}

/// Trains and scores each configuration; returns the rows and AdaLoRA's final rank pattern.
pub(crate) fn run(args: Args) -> Result<(Vec<Row>, Option<RankPattern>)> {
    let (steps, batch_size, n_held) = args.run.sizes(6);
    let out = args.run.out_dir("adalora")?;
    let model_path = lora::models::cache::smollm2()
        .context("SmolLM2-135M-Instruct is not cached: run scripts/fetch-smollm2.sh")?;

    let n_train = (steps as usize * batch_size).max(16);
    let (train_path, eval_path, _) = data::write_task(&out, args.run.seed, n_train, n_held)?;
    let tokenizer = Pretrained::load(&model_path, DType::F32, &Device::Cpu)?.tokenizer;
    let options = DataOptions::default();
    let train_data = Dataset::from_jsonl(&train_path, &tokenizer, &options)?;
    let eval_data = Dataset::from_jsonl(&eval_path, &tokenizer, &options)?;
    let pad = tokenizer.eos_token_id();
    // PEFT's phases for this short run: 10% warm-up, 20% at the final mask, a mask every step.
    let (tinit, tfinal) = (steps / 10, steps / 5);
    let adalora_lr = args.adalora_lr.unwrap_or(args.lr);
    let configs = [
        (
            "LoRA r=8 q,v",
            args.lr,
            r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#.to_string(),
        ),
        (
            "AdaLoRA 12->8 q,v",
            adalora_lr,
            format!(
                r#"{{"peft_type": "ADALORA", "init_r": 12, "target_r": 8, "lora_alpha": 24,
                    "tinit": {tinit}, "tfinal": {tfinal}, "deltaT": 1, "total_step": {steps},
                    "target_modules": ["q_proj", "v_proj"]}}"#
            ),
        ),
    ];
    println!(
        "task: {} training examples, {} held-out; {steps} steps x {batch_size} examples, lr {} (AdaLoRA {adalora_lr}); AdaLoRA tinit {tinit}, tfinal {tfinal}, deltaT 1, beta1 = beta2 = 0.85, orth_reg_weight 0.5",
        train_data.examples.len(),
        eval_data.examples.len(),
        args.lr
    );
    let mut rows = Vec::new();
    let mut pattern: Option<RankPattern> = None;
    for (name, lr, json) in configs {
        if args.skip_lora && !name.starts_with("AdaLoRA") {
            continue;
        }
        let mut p = Pretrained::load(&model_path, DType::F32, &Device::Cpu)?;
        p.model.init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &InitOptions::default()
                .with_peft_config(LoraConfig::from_json(&json)?)
                .with_seed(args.run.seed),
        )?;
        let trained = p.model.trainable_parameters().trainable;
        let dir = out.join(name.replace([' ', '=', ',', '>'], "-"));
        let (outcome, seconds) = run_config(
            &mut p,
            &train_data,
            Tuning::Lora,
            lr,
            (steps, batch_size, args.run.seed),
            &dir,
        )?;
        let (loss, exact) = held_out_scores(&p.model, &eval_data, pad)?;
        let saved =
            lora::candle::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?
                .values()
                .map(|t| t.elem_count())
                .sum();
        println!(
            "{name}: done in {seconds:.0} s, held-out loss {loss:.4}, exact match {:.1}%",
            100.0 * exact
        );
        pattern = pattern.or(outcome.rank_pattern);
        rows.push(Row {
            name,
            lr,
            trained,
            saved,
            loss,
            exact,
            seconds,
        });
    }

    println!("\n| configuration | lr | params while training | params saved | held-out loss | exact match | time |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0e} | {} | {} | {:.4} | {:.1}% | {:.0} s |",
            r.name,
            r.lr,
            r.trained,
            r.saved,
            r.loss,
            100.0 * r.exact,
            r.seconds
        );
    }
    if let Some(pattern) = &pattern {
        print_pattern(pattern);
    }
    Ok((rows, pattern))
}

/// AdaLoRA's final ranks per layer, `q_proj` and `v_proj` side by side.
fn print_pattern(pattern: &RankPattern) {
    let rank = |layer: usize, module: &str| {
        pattern
            .get(&format!("model.layers.{layer}.self_attn.{module}.lora_E"))
            .map_or(0, |m| m.iter().filter(|&&k| k).count())
    };
    let layers = pattern.len() / 2;
    let total: usize = pattern.values().flatten().filter(|&&k| k).count();
    println!(
        "\nAdaLoRA's final ranks ({total} singular values kept of {}):",
        12 * pattern.len()
    );
    println!(
        "| layer | {} |",
        (0..layers)
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(layers));
    for module in ["q_proj", "v_proj"] {
        let ranks: Vec<String> = (0..layers).map(|l| rank(l, module).to_string()).collect();
        println!("| {module} | {} |", ranks.join(" | "));
    }
}
