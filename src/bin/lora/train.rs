//! `lora train`: supervised fine-tuning of a Llama-family model on JSONL data, LoRA or full,
//! a thin layer over [`lora::models::sft`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lora::candle::Device;
use lora::config::InitLoraWeights;
use lora::models::llama::Checkpoint;
use lora::models::sft::{self, DataOptions, Dataset, Duration, Event, LossOn, SftConfig, Tuning};
use lora::models::Pretrained;
use lora::peft::convert_to_lora;
use lora::train::{AdamWConfig, TrainerConfig};
use lora::{AdaLoraSchedule, InitOptions, LoraConfig, LoraInit, LoraModelExt, SaveOptions};

use crate::generate::WeightDtype;

/// Which tokens the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossOnArg {
    /// Assistant turns and completions (every token of `text` lines).
    Completions,
    /// Every token.
    All,
}

/// `--init`: `kaiming`, or a PEFT `init_lora_weights` name (`gaussian`, `pissa`,
/// `pissa_niter_K`, `olora`).
fn parse_init(s: &str) -> Result<LoraInit, String> {
    match s {
        "kaiming" => Ok(LoraInit::Kaiming),
        _ => LoraInit::from_peft_name(s).ok_or_else(|| {
            format!(
                "`{s}` is not one of kaiming, gaussian, pissa, pissa_niter_K (K a number), olora"
            )
        }),
    }
}

/// Where a PiSSA / OLoRA run keeps the adapter right after initialisation, inside `--out`.
const INITIAL_ADAPTER: &str = "initial-adapter";
/// Where a PiSSA / OLoRA run keeps the trained adapter for the residual base, inside `--out`.
const RESIDUAL_ADAPTER: &str = "residual-adapter";

/// The arguments of `lora train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model: a `.gguf` file, a Hugging Face model directory, or a hub id.
    #[arg(long)]
    model: String,
    /// Training data, JSONL: `{"messages": [...]}`, `{"prompt", "completion"}` or `{"text"}`.
    #[arg(long)]
    data: PathBuf,
    /// Where the adapter (or, with --full, the model) and the checkpoints go.
    #[arg(long)]
    out: PathBuf,
    /// The weights' dtype while training. Default: `quantized` for a `.gguf` model (QLoRA: the
    /// projections stay as stored, the adapters are f32), else `f32`; `f32` with --full,
    /// --use-dora and --init pissa/olora (which need the dense weights).
    #[arg(long, value_enum)]
    dtype: Option<WeightDtype>,
    /// Held-out data (same formats) for the eval loss.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Layers to adapt: names (`q_proj,v_proj`), `all-linear`, or a regex over module paths.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scaling alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// Dropout on the LoRA branch.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the data (default 1).
    #[arg(long)]
    epochs: Option<f64>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Sequences are cut to this many tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Eval loss every N steps (and at the end).
    #[arg(long)]
    eval_every: Option<u64>,
    /// A checkpoint every N steps (and always on Ctrl-C).
    #[arg(long)]
    save_every: Option<u64>,
    /// A system prompt for conversations without one, replacing the template's default.
    #[arg(long)]
    system: Option<String>,
    /// Which tokens the loss covers.
    #[arg(long, value_enum, default_value = "completions")]
    loss_on: LossOnArg,
    /// Seed of the adapter's initialization, the shuffling and the dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Full fine-tuning (every weight) instead of LoRA; saves a Hugging Face model directory.
    #[arg(long)]
    full: bool,
    /// LoRA+: the B factors learn R times faster than the A factors (PEFT's loraplus_lr_ratio).
    #[arg(long, value_name = "R")]
    loraplus_ratio: Option<f64>,
    /// rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.
    #[arg(long)]
    rslora: bool,
    /// DoRA (weight-decomposed LoRA, PEFT's use_dora): a trainable magnitude per output feature
    /// of each adapted layer, saved as PEFT's lora_magnitude_vector.
    #[arg(long)]
    use_dora: bool,
    /// How the adapter is initialized: `kaiming` (PEFT's default) or `gaussian` (random A, zero
    /// B), or `pissa`, `pissa_niter_K` (randomized SVD, K iterations), `olora`, which take the
    /// adapter out of the weights. With those, OUT holds the adapter converted to plain LoRA for
    /// the original base (rank and alpha doubled, as PEFT converts them), OUT/residual-adapter
    /// the trained adapter for the residual base, OUT/initial-adapter the initial one.
    #[arg(long, default_value = "kaiming", value_parser = parse_init)]
    init: LoraInit,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them:
    /// much less memory for long sequences, about one more forward per step.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// AdaLoRA (PEFT's AdaLoraConfig): adapters of rank --init-r whose singular values a rank
    /// allocator prunes during training to an average of --target-r; the adapter is saved in
    /// PEFT's AdaLoRA format with the final rank_pattern. Takes --alpha, --dropout, --targets.
    #[arg(long, conflicts_with_all = ["rank", "full", "use_dora", "rslora", "init"])]
    adalora: bool,
    /// AdaLoRA: the rank every adapter starts with.
    #[arg(long, requires = "adalora", default_value_t = 12)]
    init_r: usize,
    /// AdaLoRA: the average rank the budget ends at.
    #[arg(long, requires = "adalora", default_value_t = 8)]
    target_r: usize,
    /// AdaLoRA: warm-up steps before the budget starts to fall.
    #[arg(long, requires = "adalora", default_value_t = 0)]
    tinit: usize,
    /// AdaLoRA: final steps at the final budget (with the final mask).
    #[arg(long, requires = "adalora", default_value_t = 0)]
    tfinal: usize,
    /// AdaLoRA: steps between two allocations (PEFT's deltaT).
    #[arg(long, requires = "adalora", default_value_t = 1)]
    delta_t: usize,
    /// AdaLoRA: EMA factor of the sensitivity.
    #[arg(long, requires = "adalora", default_value_t = 0.85)]
    beta1: f64,
    /// AdaLoRA: EMA factor of the uncertainty.
    #[arg(long, requires = "adalora", default_value_t = 0.85)]
    beta2: f64,
    /// AdaLoRA: weight of the orthogonal regulariser in the loss.
    #[arg(long, requires = "adalora", default_value_t = 0.5)]
    orth_reg_weight: f64,
    /// Continue from OUT/checkpoint-STEP (same data and settings).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The PEFT `target_modules` value of `--targets`.
fn targets_json(targets: &str) -> serde_json::Value {
    let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if targets == "all-linear" {
        serde_json::json!("all-linear")
    } else if targets.split(',').all(|t| plain(t.trim())) {
        serde_json::json!(targets
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>())
    } else {
        serde_json::json!(targets)
    }
}

/// The AdaLoRA config of `--adalora`: `base`'s targets, alpha and dropout with the AdaLoRA
/// flags and `total_step` the run's `total` steps, checked as PEFT checks it before training.
fn adalora_config(
    args: &TrainArgs,
    base: LoraConfig,
    total: u64,
) -> Result<LoraConfig, Box<dyn std::error::Error>> {
    if total == 0 {
        return Err("--adalora needs at least one training step (total_step > 0)".into());
    }
    let schedule = AdaLoraSchedule {
        target_r: args.target_r,
        tinit: args.tinit,
        tfinal: args.tfinal,
        delta_t: args.delta_t,
        beta1: args.beta1,
        beta2: args.beta2,
        orth_reg_weight: args.orth_reg_weight,
        total_step: Some(usize::try_from(total)?),
    };
    if args.tinit + args.tfinal >= usize::try_from(total)? {
        return Err(format!(
            "--tinit {} must be below the run's {total} steps minus --tfinal {}: no step is left \
             to allocate ranks in (lower --tinit / --tfinal or train longer)",
            args.tinit, args.tfinal
        )
        .into());
    }
    schedule.check()?;
    let mut config = LoraConfig::adalora(args.init_r, args.alpha, Vec::<String>::new(), schedule);
    config.targets = base.targets;
    config.dropout = base.dropout;
    config.validate()?;
    Ok(config)
}

/// Runs `lora train`.
pub fn run(args: TrainArgs) -> Result<(), Box<dyn std::error::Error>> {
    lora::train::prepare_training_process();
    let path = lora::models::hub::resolve_model(&args.model)?;
    let dtype = match (args.dtype, args.full) {
        (Some(WeightDtype::Quantized), true) => {
            return Err(
                "--full trains every weight, which needs them dense: use --dtype f32 \
                        (a quantized base trains LoRA adapters only)"
                    .into(),
            )
        }
        (Some(dtype), _) => dtype,
        // DoRA and PiSSA / OLoRA read the dense weight: they keep the f32 default.
        (None, false)
            if !args.use_dora
                && args.init.decomposition().is_none()
                && matches!(Checkpoint::of(&path)?, Checkpoint::Gguf(_)) =>
        {
            WeightDtype::Quantized
        }
        (None, _) => WeightDtype::F32,
    };
    let start = Instant::now();
    let Pretrained {
        mut model,
        tokenizer,
        ..
    } = Pretrained::load(&path, dtype.precision(), &Device::Cpu)?;
    eprintln!(
        "loaded {} ({}) in {:.1} s",
        path.display(),
        match dtype {
            WeightDtype::Quantized => "base quantized as stored, adapters f32",
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        },
        start.elapsed().as_secs_f64()
    );

    let options = DataOptions {
        system: args.system.clone(),
        loss_on: match args.loss_on {
            LossOnArg::Completions => LossOn::Completions,
            LossOnArg::All => LossOn::All,
        },
        max_seq_len: args.max_seq_len,
    };
    let data = Dataset::from_jsonl(&args.data, &tokenizer, &options)?;
    let eval = args
        .eval
        .as_ref()
        .map(|p| Dataset::from_jsonl(p, &tokenizer, &options))
        .transpose()?;
    for d in std::iter::once(&data).chain(eval.as_ref()) {
        eprintln!(
            "{}: {} examples, {} tokens ({} trained on){}{}",
            d.path.display(),
            d.examples.len(),
            d.tokens(),
            d.loss_tokens(),
            if d.truncated > 0 {
                format!(", {} truncated to {} tokens", d.truncated, args.max_seq_len)
            } else {
                String::new()
            },
            if d.skipped > 0 {
                format!(", {} skipped (nothing left to train on)", d.skipped)
            } else {
                String::new()
            }
        );
    }

    let tuning = if args.full {
        Tuning::Full
    } else {
        Tuning::Lora
    };
    let duration = match (args.steps, args.epochs) {
        (Some(n), _) => Duration::Steps(n),
        (None, Some(e)) => Duration::Epochs(e),
        (None, None) => Duration::Epochs(1.0),
    };
    if tuning == Tuning::Lora {
        let mut config = LoraConfig::from_json(
            &serde_json::json!({
                "r": args.rank,
                "lora_alpha": args.alpha,
                "lora_dropout": args.dropout,
                "use_rslora": args.rslora,
                "use_dora": args.use_dora,
                "init_lora_weights": InitLoraWeights::from(args.init),
                "target_modules": targets_json(&args.targets),
            })
            .to_string(),
        )?;
        if args.adalora {
            let total = SftConfig {
                duration,
                batch_size: args.batch_size,
                grad_accum: args.grad_accum,
                ..SftConfig::default()
            }
            .total_steps(data.examples.len());
            config = adalora_config(&args, config, total)?;
        }
        model.init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &InitOptions::default()
                .with_peft_config(config)
                .with_seed(args.seed),
        )?;
        if model.named_trainable_vars().is_empty() {
            return Err(format!("--targets {} matches no layer of the model", args.targets).into());
        }
        eprintln!("{}", model.trainable_parameters());
    }

    let config = SftConfig {
        trainer: TrainerConfig {
            lr: args.lr,
            warmup_steps: args.warmup_steps,
            max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
            adamw: AdamWConfig {
                weight_decay: args.weight_decay,
                ..Default::default()
            },
            ..Default::default()
        },
        duration,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        eval_every: args.eval_every,
        save_every: args.save_every,
        seed: args.seed,
        tuning,
        out: args.out.clone(),
        save: SaveOptions {
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(args.model.clone()),
        },
        resume: args.resume.clone(),
        loraplus_ratio: args.loraplus_ratio,
        gradient_checkpointing: args.gradient_checkpointing,
    };

    // PiSSA / OLoRA: the adapter came out of the weights. Keep it as initialised: the end of the
    // run turns the trained one into a plain adapter for the original base (as PEFT's
    // `path_initial_model_for_weight_conversion`).
    let decomposed = tuning == Tuning::Lora && args.init.decomposition().is_some();
    if decomposed {
        model.save_adapter_with(args.out.join(INITIAL_ADAPTER), &config.save)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step and writing a checkpoint (Ctrl-C again to quit now)"
            );
        })?;
    }
    let total = config.total_steps(data.examples.len());
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(if args.full {
        "full"
    } else if args.adalora {
        "adalora"
    } else {
        "lora"
    });
    let mut on_event = |event: &Event| match event {
        Event::Step {
            stats,
            loss,
            tokens_per_s,
            epoch,
            ..
        } => {
            bar.set_position(stats.step);
            bar.set_message(format!(
                "loss {loss:.4} lr {:.2e} {tokens_per_s:.0} tok/s epoch {epoch}",
                stats.lr
            ));
            if args.quiet {
                eprintln!(
                    "step {} loss {loss:.4} lr {:.3e} grad-norm {:.3}",
                    stats.step, stats.lr, stats.grad_norm
                );
            }
        }
        Event::Eval { step, loss } => bar.println(format!("step {step}: eval loss {loss:.4}")),
        Event::Checkpoint { path } => bar.println(format!("checkpoint {}", path.display())),
    };
    let outcome = sft::train(
        &mut model,
        &tokenizer,
        &data,
        eval.as_ref(),
        &config,
        &stop,
        &mut on_event,
    )?;
    bar.finish_and_clear();
    eprintln!(
        "{} steps, last loss {}, {:.0} tokens/s{}",
        outcome.steps,
        outcome.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        outcome.tokens as f64 / outcome.seconds.max(1e-9),
        outcome
            .eval_loss
            .map_or(String::new(), |l| format!(", eval loss {l:.4}"))
    );
    if let Some(pattern) = outcome.rank_pattern.as_ref().filter(|_| !outcome.stopped) {
        let ranks: Vec<String> = pattern
            .iter()
            .map(|(k, m)| {
                let kept = m.iter().filter(|&&b| b).count();
                format!("{}: {kept}", k.trim_end_matches(".lora_E"))
            })
            .collect();
        eprintln!("AdaLoRA ranks kept: {}", ranks.join(", "));
    }
    if outcome.stopped {
        eprintln!(
            "stopped: resume with --resume {}",
            args.out.join(sft::checkpoint_name(outcome.steps)).display()
        );
    } else if decomposed {
        let residual = args.out.join(RESIDUAL_ADAPTER);
        std::fs::create_dir_all(&residual)?;
        for file in [lora::peft::ADAPTER_FILE, lora::peft::CONFIG_FILE] {
            std::fs::rename(args.out.join(file), residual.join(file))?;
        }
        convert_to_lora(&residual, args.out.join(INITIAL_ADAPTER), &args.out)?;
        eprintln!(
            "wrote the adapter, converted to plain LoRA for the original base, to {} \
             (for the residual base: {})",
            args.out.display(),
            residual.display()
        );
    } else {
        eprintln!(
            "wrote {} to {}",
            if args.full {
                "the model"
            } else {
                "the adapter"
            },
            args.out.display()
        );
    }
    Ok(())
}
