//! The supervised fine-tuning loop: epochs of shuffled batches, gradient accumulation, eval,
//! checkpoints that resume exactly, and the final adapter (or model) written out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Var};
use lora_runtime::rng::{DropoutRng, SeededRng};
use lora_runtime::train::{
    Checkpointing, RankAllocator, RankPattern, StepStats, Trainer, TrainerConfig,
};
use lora_runtime::{LoraModelExt, SaveOptions};
use serde::{Deserialize, Serialize};

use super::batch::{loss_sum, targets_loss, Batch, CausalLm};
use super::data::{Dataset, Example};
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// The file of a checkpoint that holds the loop's own state.
pub const STATE_FILE: &str = "trainer_state.json";
/// The weights file of a full fine-tuning checkpoint.
const WEIGHTS_FILE: &str = "model.safetensors";
/// The adapter file of a LoRA checkpoint.
const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Duration {
    /// This many optimizer steps.
    Steps(u64),
    /// This many passes over the data (fractions allowed).
    Epochs(f64),
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// The model's active LoRA adapter (`A` and `B`), everything else frozen.
    Lora,
    /// Every weight (the full fine-tuning baseline).
    Full,
}

/// The settings of a run (`lora train`'s flags).
#[derive(Debug, Clone, PartialEq)]
pub struct SftConfig {
    /// Optimizer settings; `total_steps` is set from `duration`.
    pub trainer: TrainerConfig,
    /// How long.
    pub duration: Duration,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Eval loss every this many steps (and at the end) when eval data is given.
    pub eval_every: Option<u64>,
    /// A checkpoint every this many steps.
    pub save_every: Option<u64>,
    /// Seed of the shuffling and of the dropout masks.
    pub seed: u64,
    /// What is trained.
    pub tuning: Tuning,
    /// The output directory: the adapter (or model) at the end, `checkpoint-STEP/` on the way.
    pub out: PathBuf,
    /// What the adapter's config says about its base.
    pub save: SaveOptions,
    /// Continue from this checkpoint (`OUT/checkpoint-STEP`) of a run with the same data and
    /// settings.
    pub resume: Option<PathBuf>,
    /// LoRA+: the `B` factors learn this many times faster than the `A` factors (`None`: the
    /// same rate; PEFT's `loraplus_lr_ratio`, 16 in the paper's experiments).
    pub loraplus_ratio: Option<f64>,
    /// Recompute each block's activations in the backward pass instead of keeping them (less
    /// memory, one more forward).
    pub gradient_checkpointing: bool,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            trainer: TrainerConfig::default(),
            duration: Duration::Epochs(1.0),
            batch_size: 8,
            grad_accum: 1,
            eval_every: None,
            save_every: None,
            seed: 0,
            tuning: Tuning::Lora,
            out: PathBuf::from("out"),
            save: SaveOptions::default(),
            resume: None,
            loraplus_ratio: None,
            gradient_checkpointing: false,
        }
    }
}

impl SftConfig {
    /// The number of optimizer steps for `examples` examples.
    pub fn total_steps(&self, examples: usize) -> u64 {
        match self.duration {
            Duration::Steps(n) => n,
            Duration::Epochs(e) => {
                let per_step = (self.batch_size * self.grad_accum).max(1) as f64;
                (e * examples as f64 / per_step).ceil().max(1.0) as u64
            }
        }
    }
}

/// What the loop reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// An optimizer step finished.
    Step {
        /// The optimizer's report.
        stats: StepStats,
        /// The step's mean loss per target token.
        loss: f32,
        /// Steps of the run.
        total: u64,
        /// Input tokens per second since the run (or resume) started.
        tokens_per_s: f64,
        /// Passes over the data begun so far (1 during the first).
        epoch: u64,
    },
    /// An evaluation finished.
    Eval {
        /// After this many steps.
        step: u64,
        /// Mean loss per target token on the eval data.
        loss: f32,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its directory.
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Steps done (counting those before a resume).
    pub steps: u64,
    /// The last step's loss.
    pub last_loss: Option<f32>,
    /// The last eval loss.
    pub eval_loss: Option<f32>,
    /// Whether the stop flag ended it early (a checkpoint was written, no final output).
    pub stopped: bool,
    /// Input tokens processed in this process.
    pub tokens: usize,
    /// Wall time of the steps in this process, in seconds.
    pub seconds: f64,
    /// AdaLoRA: the singular values the rank allocation kept (the saved adapter's
    /// `rank_pattern`), once it made a mask.
    pub rank_pattern: Option<RankPattern>,
}

/// The loop's state saved in a checkpoint's `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct LoopState {
    step: u64,
    total_steps: u64,
    epoch: u64,
    order: Vec<u32>,
    cursor: usize,
    shuffle_rng: [u64; 4],
    dropout_rng: [u64; 4],
    examples: usize,
    batch_size: usize,
    grad_accum: usize,
    seed: u64,
    full: bool,
    #[serde(default)]
    loraplus_ratio: Option<f64>,
    #[serde(default)]
    adalora: bool,
}

/// Where the data stream is: the epoch's order and the next position in it.
struct Stream {
    order: Vec<u32>,
    cursor: usize,
    epoch: u64,
    rng: SeededRng,
}

impl Stream {
    fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            order: Vec::new(),
            cursor: 0,
            epoch: 0,
            rng: SeededRng::new(seed),
        };
        s.reshuffle(n);
        s
    }

    fn reshuffle(&mut self, n: usize) {
        self.order = (0..n as u32).collect();
        self.rng.shuffle(&mut self.order);
        self.cursor = 0;
        self.epoch += 1;
    }

    /// The next `k` example indices, continuing into a freshly shuffled epoch at the end.
    fn take(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cursor == self.order.len() {
                self.reshuffle(n);
            }
            out.push(self.order[self.cursor] as usize);
            self.cursor += 1;
        }
        out
    }
}

/// The name of a checkpoint directory.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Mean loss per target token of `data` (dropout off, nothing trained).
///
/// # Errors
/// Model errors.
pub fn evaluate<M: CausalLm + ?Sized>(
    model: &M,
    data: &Dataset,
    batch_size: usize,
    pad: u32,
    device: &Device,
) -> Result<f32> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in data.examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::new(&refs, pad, device)?;
        let loss = targets_loss(model, &batch, false)?;
        sum += f64::from(loss.to_scalar::<f32>()?);
        n += batch.loss_tokens;
    }
    Ok((sum / n.max(1) as f64) as f32)
}

/// A supervised fine-tuning run of `model` on `data`.
///
/// With [`Tuning::Lora`] the model's active adapter is trained (create it first, e.g. with
/// `init_adapter_with`); with [`Tuning::Full`] every weight is made trainable. An AdaLoRA
/// adapter (its schedule's `total_step` the run's steps) trains as PEFT trains it: the
/// orthogonal regulariser in the loss, a [`RankAllocator`] after each step, and the adapter
/// saved pruned to the final rank pattern. `stop` is checked
/// after each step: when set, a checkpoint is written and the run returns with
/// [`Outcome::stopped`]. [`SftConfig::resume`] continues from a checkpoint of the same run
/// settings and ends with the same weights as a run that was never interrupted.
///
/// # Errors
/// [`ModelError::Input`] for settings that do not fit (batch size 0, a checkpoint of other
/// settings, an AdaLoRA schedule that does not fit the run); I/O errors naming the file;
/// [`lora_runtime::Error::Training`] for a non-finite loss.
pub fn train<M: CausalLm>(
    model: &mut M,
    tokenizer: &TextTokenizer,
    data: &Dataset,
    eval: Option<&Dataset>,
    config: &SftConfig,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Outcome> {
    if config.batch_size == 0 || config.grad_accum == 0 {
        return Err(ModelError::Input(
            "batch size and gradient accumulation must be at least 1".into(),
        ));
    }
    let n = data.examples.len();
    let total = config.total_steps(n);
    let vars: Vec<(String, Var)> = match config.tuning {
        Tuning::Lora => {
            let vars = model.named_trainable_vars();
            if vars.is_empty() {
                return Err(ModelError::Input(
                    "the model has no active LoRA adapter to train".into(),
                ));
            }
            vars
        }
        Tuning::Full => model.unfreeze()?,
    };
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let trainer_config = TrainerConfig {
        total_steps: total,
        grad_accum: config.grad_accum,
        ..config.trainer
    };
    let mut trainer = Trainer::new(vars.clone(), trainer_config)?;
    let mut allocator = match config.tuning {
        Tuning::Lora => adalora_allocator(model, total)?,
        Tuning::Full => None,
    };
    trainer.keep_step_grads(allocator.is_some());
    if let Some(ratio) = config.loraplus_ratio {
        if !(ratio.is_finite() && ratio > 0.0) {
            return Err(ModelError::Input(format!(
                "the LoRA+ ratio must be positive, got {ratio}"
            )));
        }
        trainer.set_lr_scales(lora_runtime::train::loraplus(ratio));
    }
    let dropout = DropoutRng::new(config.seed ^ 0x000D_8090_u64);
    let mut stream = Stream::new(n, config.seed);
    if let Some(dir) = &config.resume {
        restore(
            dir,
            &vars,
            &mut trainer,
            allocator.as_mut(),
            &mut stream,
            &dropout,
            config,
            n,
            total,
        )?;
    }
    model.set_dropout_rng(Some(&dropout));
    if config.gradient_checkpointing {
        let ck = Checkpointing::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            Some(dropout.clone()),
        );
        trainer.set_grad_sink(Some(ck.sink().clone()));
        model.set_gradient_checkpointing(Some(ck))?;
    }
    let pad = tokenizer.eos_token_id();
    let mut outcome = Outcome {
        steps: trainer.steps(),
        last_loss: None,
        eval_loss: None,
        stopped: false,
        tokens: 0,
        seconds: 0.0,
        rank_pattern: None,
    };
    let start = Instant::now();
    let run_eval =
        |model: &mut M, step: u64, on_event: &mut dyn FnMut(&Event)| -> Result<Option<f32>> {
            let Some(eval) = eval else { return Ok(None) };
            // Dropout off for the eval, back on for the steps after it.
            model.set_training(false);
            let loss = evaluate(model, eval, config.batch_size, pad, &device);
            model.set_training(true);
            let loss = loss?;
            on_event(&Event::Eval { step, loss });
            Ok(Some(loss))
        };
    model.set_training(true);
    while trainer.steps() < total {
        let micro: Vec<Vec<usize>> = (0..config.grad_accum)
            .map(|_| stream.take(config.batch_size, n))
            .collect();
        let batches = micro
            .iter()
            .map(|idx| {
                let refs: Vec<&Example> = idx.iter().map(|&i| &data.examples[i]).collect();
                Batch::new(&refs, pad, &device)
            })
            .collect::<Result<Vec<_>>>()?;
        let targets: usize = batches.iter().map(|b| b.loss_tokens).sum();
        // AdaLoRA's regulariser, counted once per step (a share in each micro-batch); the
        // reported loss leaves it out.
        let penalty = match &allocator {
            Some(a) if a.schedule().orth_reg_weight > 0.0 => {
                Some((a.orth_penalty()? / batches.len() as f64)?)
            }
            _ => None,
        };
        let penalty_value = match &penalty {
            Some(p) => f64::from(p.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?),
            None => 0.0,
        };
        let mut loss = 0f64;
        for batch in &batches {
            let mut l = (loss_sum(model, batch)? / targets.max(1) as f64)?;
            if let Some(p) = &penalty {
                l = (l + p)?;
            }
            loss += f64::from(trainer.backward(&l)?) - penalty_value;
            outcome.tokens += batch.tokens;
        }
        let stats = trainer.step()?;
        if let Some(a) = allocator.as_mut() {
            a.update_and_allocate(stats.step, |v| trainer.step_grad(v).cloned())?;
            outcome.rank_pattern = a.rank_pattern().cloned();
        }
        outcome.steps = stats.step;
        outcome.last_loss = Some(loss as f32);
        outcome.seconds = start.elapsed().as_secs_f64();
        on_event(&Event::Step {
            stats,
            loss: loss as f32,
            total,
            tokens_per_s: outcome.tokens as f64 / outcome.seconds.max(1e-9),
            epoch: stream.epoch,
        });
        let step = stats.step;
        if config
            .eval_every
            .is_some_and(|e| e > 0 && step % e == 0 && step < total)
        {
            outcome.eval_loss = run_eval(model, step, on_event)?.or(outcome.eval_loss);
        }
        let stopping = stop.load(Ordering::SeqCst);
        if stopping || config.save_every.is_some_and(|e| e > 0 && step % e == 0) {
            let path = save_checkpoint(
                model,
                &trainer,
                allocator.as_ref(),
                &stream,
                &dropout,
                config,
                n,
                total,
            )?;
            on_event(&Event::Checkpoint { path });
        }
        if stopping {
            outcome.stopped = true;
            model.set_training(false);
            model.set_gradient_checkpointing(None)?;
            return Ok(outcome);
        }
    }
    outcome.eval_loss = run_eval(model, trainer.steps(), on_event)?.or(outcome.eval_loss);
    model.set_training(false);
    model.set_dropout_rng(None);
    model.set_gradient_checkpointing(None)?;
    if let Some(a) = &allocator {
        a.prune(model)?;
    }
    save_output(model, tokenizer, config, &config.out)?;
    Ok(outcome)
}

/// The rank allocator of an AdaLoRA run (`None` when the model's adapters are not AdaLoRA),
/// its schedule checked against the run's `total` steps.
fn adalora_allocator<M: CausalLm>(model: &M, total: u64) -> Result<Option<RankAllocator>> {
    let is_adalora = model
        .lora_layers()
        .iter()
        .any(|(_, l, _)| l.adapter().is_some_and(|a| a.is_adalora()));
    if !is_adalora {
        return Ok(None);
    }
    let allocator = RankAllocator::new(model)?;
    let planned = allocator.schedule().total_step;
    if planned.map(|t| t as u64) != Some(total) {
        return Err(ModelError::Input(format!(
            "the AdaLoRA schedule plans {} steps (total_step) but the run has {total}: set \
             `total_step` to the run's steps",
            planned.map_or("no".to_string(), |t| t.to_string())
        )));
    }
    Ok(Some(allocator))
}

/// Writes what the run produces into `dir`: the adapter (LoRA) or the model (full).
fn save_output<M: CausalLm>(
    model: &M,
    tokenizer: &TextTokenizer,
    config: &SftConfig,
    dir: &Path,
) -> Result<()> {
    match config.tuning {
        Tuning::Lora => Ok(model.save_adapter_with(dir, &config.save)?),
        Tuning::Full => model.save_pretrained(dir, tokenizer),
    }
}

/// Writes `OUT/checkpoint-STEP/` whole or not at all: built in a temporary directory, then
/// renamed into place.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint<M: CausalLm>(
    model: &M,
    trainer: &Trainer,
    allocator: Option<&RankAllocator>,
    stream: &Stream,
    dropout: &DropoutRng,
    config: &SftConfig,
    examples: usize,
    total: u64,
) -> Result<PathBuf> {
    let step = trainer.steps();
    let target = config.out.join(checkpoint_name(step));
    let tmp = config.out.join(format!(
        ".{}.tmp-{}",
        checkpoint_name(step),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        match config.tuning {
            Tuning::Lora => model.save_adapter_with(&tmp, &config.save)?,
            Tuning::Full => {
                let weights: Vec<(String, candle_core::Tensor)> = trainer
                    .optimizer()
                    .vars()
                    .map(|(k, v)| (k.to_string(), v.as_tensor().clone()))
                    .collect();
                lora_runtime::train::write_safetensors(
                    &tmp.join(WEIGHTS_FILE),
                    &weights,
                    HashMap::new(),
                )?;
            }
        }
        trainer.save_state(&tmp)?;
        if let Some(a) = allocator {
            a.save_state(&tmp)?;
        }
        let state = LoopState {
            step,
            total_steps: total,
            epoch: stream.epoch,
            order: stream.order.clone(),
            cursor: stream.cursor,
            shuffle_rng: stream.rng.state(),
            dropout_rng: dropout.state(),
            examples,
            batch_size: config.batch_size,
            grad_accum: config.grad_accum,
            seed: config.seed,
            full: config.tuning == Tuning::Full,
            loraplus_ratio: config.loraplus_ratio,
            adalora: allocator.is_some(),
        };
        let path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| ModelError::io(&target, e))?;
        }
        std::fs::rename(&tmp, &target).map_err(|e| ModelError::io(&target, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| target)
}

/// Loads a checkpoint into the variables, the trainer, the data stream and the dropout
/// generator, after checking it belongs to a run with these settings. Nothing changes on error.
#[allow(clippy::too_many_arguments)]
fn restore(
    dir: &Path,
    vars: &[(String, Var)],
    trainer: &mut Trainer,
    allocator: Option<&mut RankAllocator>,
    stream: &mut Stream,
    dropout: &DropoutRng,
    config: &SftConfig,
    examples: usize,
    total: u64,
) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let state: LoopState = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let expected = [
        ("examples", state.examples as u64, examples as u64),
        (
            "batch size",
            state.batch_size as u64,
            config.batch_size as u64,
        ),
        (
            "gradient accumulation",
            state.grad_accum as u64,
            config.grad_accum as u64,
        ),
        ("seed", state.seed, config.seed),
        ("total steps", state.total_steps, total),
        (
            "full fine-tuning",
            u64::from(state.full),
            u64::from(config.tuning == Tuning::Full),
        ),
        (
            "AdaLoRA",
            u64::from(state.adalora),
            u64::from(allocator.is_some()),
        ),
    ];
    for (what, saved, now) in expected {
        if saved != now {
            return Err(ModelError::Input(format!(
                "{}: the checkpoint was made with {what} {saved}, this run has {now}: resume with the same data and settings",
                path.display()
            )));
        }
    }
    if state.loraplus_ratio != config.loraplus_ratio {
        return Err(ModelError::Input(format!(
            "{}: the checkpoint was made with LoRA+ ratio {:?}, this run has {:?}",
            path.display(),
            state.loraplus_ratio,
            config.loraplus_ratio
        )));
    }
    if state.order.len() != examples || state.cursor > examples {
        return Err(ModelError::Input(format!(
            "{}: the data position does not fit {examples} examples",
            path.display()
        )));
    }
    let weights_path = dir.join(if state.full {
        WEIGHTS_FILE
    } else {
        ADAPTER_FILE
    });
    let bytes = std::fs::read(&weights_path).map_err(|e| ModelError::io(&weights_path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .or_else(|| tensors.get(&format!("base_model.model.{name}")))
            .ok_or_else(|| ModelError::Tensor {
                path: weights_path.clone(),
                name: name.clone(),
                reason: "missing from the checkpoint".into(),
            })?;
        if t.dims() != var.dims() {
            return Err(ModelError::Tensor {
                path: weights_path.clone(),
                name: name.clone(),
                reason: format!("shape {:?}, the model's {:?}", t.dims(), var.dims()),
            });
        }
        values.push(t.to_dtype(var.dtype())?.to_device(var.device())?);
    }
    if let Some(a) = allocator {
        a.load_state(dir)?;
    }
    trainer.load_state(dir)?;
    for ((_, var), value) in vars.iter().zip(values) {
        var.set(&value)?;
    }
    stream.order = state.order;
    stream.cursor = state.cursor;
    stream.epoch = state.epoch;
    stream.rng = SeededRng::from_state(state.shuffle_rng);
    dropout.set_state(state.dropout_rng);
    if trainer.steps() != state.step {
        return Err(ModelError::Input(format!(
            "{}: step {} but the optimizer state is at step {}",
            path.display(),
            state.step,
            trainer.steps()
        )));
    }
    Ok(())
}
