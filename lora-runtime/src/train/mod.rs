//! The pieces of a training loop for any `#[lora]` model: [`Trainer`] (AdamW, warmup and cosine
//! decay, gradient accumulation and clipping, a state that saves and resumes exactly) and
//! [`SeededRng`](crate::rng::SeededRng) / [`DropoutRng`](crate::rng::DropoutRng) for a run that
//! reproduces bit for bit.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::{Linear, VarMap};
//! use lora_runtime::train::{Trainer, TrainerConfig};
//! use lora_runtime::{InitOptions, LayerConfig, LoraLinear, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let mut layer = LoraLinear::from(Linear::new(Tensor::randn(0f32, 1., (8, 8), &dev)?, None));
//! layer.init_adapter_with(&VarMap::new(), &InitOptions::default().with_config(LayerConfig::new(2, 4.0)))?;
//! let config = TrainerConfig { lr: 1e-2, total_steps: 20, grad_accum: 2, ..Default::default() };
//! let mut trainer = Trainer::new(layer.named_trainable_vars(), config)?;
//! let x = Tensor::randn(0f32, 1., (4, 8), &dev)?;
//! let first = layer.forward(&x)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
//! for _ in 0..20 {
//!     for _ in 0..2 {
//!         // Each micro-batch's loss, scaled so that the accumulated gradient is the mean.
//!         let loss = (layer.forward(&x)?.sqr()?.mean_all()? * 0.5)?;
//!         trainer.backward(&loss)?;
//!     }
//!     trainer.step()?;
//! }
//! assert!(layer.forward(&x)?.sqr()?.mean_all()?.to_scalar::<f32>()? < first);
//! # Ok::<(), lora_runtime::Error>(())
//! ```

mod adalora;
mod checkpoint;
mod optim;
mod process;
mod schedule;

pub use adalora::{RankAllocator, RankPattern, ADALORA_STATE_FILE};
pub use checkpoint::{Checkpointing, GradSink};
pub use optim::{AdamW, AdamWConfig};
pub use process::prepare_training_process;
pub use schedule::LrSchedule;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::fs::{RealFs, Staging};
use crate::peft::serialize_tensors;

/// The file [`Trainer::save_state`] writes in a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// A training run's optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// The peak learning rate.
    pub lr: f64,
    /// Warmup steps (linear from 0), then cosine decay to 0 at `total_steps`.
    pub warmup_steps: u64,
    /// Optimizer steps of the run (0: a constant learning rate).
    pub total_steps: u64,
    /// Micro-batches per optimizer step (informational: [`Trainer::backward`] adds up
    /// whatever it is given until [`Trainer::step`]).
    pub grad_accum: usize,
    /// Clip the gradients' global L2 norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// AdamW's other settings.
    pub adamw: AdamWConfig,
}

impl Default for TrainerConfig {
    /// `lora train`'s defaults: lr 2e-4, no warmup, clipping at 1.0, no weight decay.
    fn default() -> Self {
        Self {
            lr: 2e-4,
            warmup_steps: 0,
            total_steps: 0,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            adamw: AdamWConfig::default(),
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step's number (1 for the first).
    pub step: u64,
    /// The learning rate it used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over named variables with a learning-rate schedule, gradient accumulation and
/// clipping: call [`backward`](Self::backward) for each micro-batch's loss, then
/// [`step`](Self::step). [`save_state`](Self::save_state) and
/// [`load_state`](Self::load_state) make a resumed run continue exactly.
#[derive(Debug)]
pub struct Trainer {
    optimizer: AdamW,
    schedule: LrSchedule,
    max_grad_norm: Option<f64>,
    /// The accumulated gradient of each variable, in the optimizer's order.
    grads: Vec<Option<Tensor>>,
    /// Gradients computed inside checkpointed blocks.
    sink: Option<GradSink>,
    /// The gradients the last step applied (after clipping), kept when asked for.
    step_grads: Option<Vec<Option<Tensor>>>,
}

impl Trainer {
    /// A trainer for `vars` (e.g. [`LoraModelExt::named_trainable_vars`](crate::LoraModelExt::named_trainable_vars)).
    ///
    /// # Errors
    /// [`Error::Training`] for no variables, duplicate names or an invalid setting.
    pub fn new(vars: Vec<(String, Var)>, config: TrainerConfig) -> Result<Self> {
        if vars.is_empty() {
            return Err(Error::Training {
                reason: "nothing to train: no trainable variables".into(),
            });
        }
        let bad = |what: &str, v: f64| Error::Training {
            reason: format!("invalid {what} {v}"),
        };
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(bad("learning rate", config.lr));
        }
        if !(config.adamw.weight_decay.is_finite() && config.adamw.weight_decay >= 0.0) {
            return Err(bad("weight decay", config.adamw.weight_decay));
        }
        if let Some(g) = config.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return Err(bad("max gradient norm", g));
            }
        }
        let n = vars.len();
        Ok(Self {
            optimizer: AdamW::new(vars, config.adamw)?,
            schedule: LrSchedule::new(config.lr, config.warmup_steps, config.total_steps),
            max_grad_norm: config.max_grad_norm,
            grads: vec![None; n],
            sink: None,
            step_grads: None,
        })
    }

    /// Adds the gradients of checkpointed blocks (see [`Checkpointing::sink`]) to those of
    /// each [`backward`](Self::backward).
    pub fn set_grad_sink(&mut self, sink: Option<GradSink>) {
        self.sink = sink;
    }

    /// Keeps the gradients each [`step`](Self::step) applies (after clipping) until the next
    /// step, for [`step_grad`](Self::step_grad): what a rank allocator reads after the optimizer
    /// step (see [`RankAllocator`]). Off by default: they hold one gradient-sized copy
    /// alive between steps.
    pub fn keep_step_grads(&mut self, keep: bool) {
        self.step_grads = keep.then(|| vec![None; self.grads.len()]);
    }

    /// The gradient of `var` that the last step applied (clipped as it was applied), when
    /// [`keep_step_grads`](Self::keep_step_grads) is on and `var` is one of the trainer's.
    pub fn step_grad(&self, var: &Var) -> Option<&Tensor> {
        let id = var.as_tensor().id();
        let i = self
            .optimizer
            .vars()
            .position(|(_, v)| v.as_tensor().id() == id)?;
        self.step_grads.as_ref()?.get(i)?.as_ref()
    }

    /// Sets each variable's learning-rate multiplier from its name, e.g. [`loraplus`].
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.optimizer.set_lr_scales(scale);
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.optimizer.steps()
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.schedule.lr(self.optimizer.steps())
    }

    /// The optimizer (its variables and moments).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Back-propagates `loss` (a scalar) and adds its gradients to those accumulated since the
    /// last step; returns the loss's value.
    ///
    /// # Errors
    /// [`Error::Training`] for a non-finite loss (nothing is accumulated); candle errors.
    pub fn backward(&mut self, loss: &Tensor) -> Result<f32> {
        let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Training {
                reason: format!(
                    "the loss is {value} before step {}: lower the learning rate or check the data",
                    self.steps() + 1
                ),
            });
        }
        let store = loss.backward()?;
        for ((_, var), acc) in self.optimizer.vars().zip(self.grads.iter_mut()) {
            let from_sink = self.sink.as_ref().and_then(|s| s.take(var));
            for g in store
                .get(var.as_tensor())
                .cloned()
                .into_iter()
                .chain(from_sink)
            {
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(value)
    }

    /// Clips the accumulated gradients, takes one AdamW step at the schedule's learning rate
    /// and clears them.
    ///
    /// # Errors
    /// [`Error::Training`] when no gradient was accumulated or the gradient norm is not finite
    /// (the variables are left unchanged and the gradients dropped); candle errors.
    pub fn step(&mut self) -> Result<StepStats> {
        let n = self.grads.len();
        let grads = std::mem::replace(&mut self.grads, vec![None; n]);
        let step = self.steps() + 1;
        if grads.iter().all(Option::is_none) {
            return Err(Error::Training {
                reason: format!(
                    "step {step}: no gradient reached the trainable variables (call `backward` first)"
                ),
            });
        }
        let mut sq = 0f64;
        for g in grads.iter().flatten() {
            // Squares summed in the gradient's dtype (a parameter-sized f64 copy would cost more
            // than the sum): ample precision for a clipping threshold.
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Training {
                reason: format!("step {step}: the gradient norm is {grad_norm}"),
            });
        }
        let grads = match self.max_grad_norm {
            // PyTorch's `clip_grad_norm_`: scale by max / (norm + 1e-6) when above.
            Some(max) if grad_norm > max => {
                let scale = max / (grad_norm + 1e-6);
                grads
                    .into_iter()
                    .map(|g| g.map(|g| g * scale).transpose())
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
            _ => grads,
        };
        let lr = self.next_lr();
        self.optimizer.step(&grads, lr)?;
        if let Some(kept) = self.step_grads.as_mut() {
            // Detached: a gradient keeps the backward graph (and the step's activations) alive.
            *kept = grads.into_iter().map(|g| g.map(|g| g.detach())).collect();
        }
        Ok(StepStats {
            step,
            lr,
            grad_norm,
        })
    }

    /// Writes the optimizer's moments and step count to `dir/optimizer.safetensors`
    /// (atomically). The variables themselves are the caller's to save (an adapter with
    /// [`save_adapter`](crate::LoraModelExt::save_adapter)).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let metadata = HashMap::from([("steps".to_string(), self.steps().to_string())]);
        write_safetensors(
            &dir.join(OPTIMIZER_FILE),
            &self.optimizer.state_tensors(),
            metadata,
        )
    }

    /// Restores what [`save_state`](Self::save_state) wrote; the trainer is unchanged on error.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::SafeTensors`] naming the file; [`Error::Training`] naming a
    /// moment that does not fit the variables.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(OPTIMIZER_FILE);
        let (tensors, metadata) = read_safetensors(&path)?;
        let steps = metadata
            .get("steps")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::BadMetadata {
                file: path.clone(),
                key: "steps".into(),
                reason: "missing or not a step count".into(),
            })?;
        self.optimizer
            .load_state(tensors, steps)
            .map_err(|e| match e {
                Error::Training { reason } => Error::Training {
                    reason: format!("{}: {reason}", path.display()),
                },
                other => other,
            })?;
        self.grads = vec![None; self.grads.len()];
        if let Some(kept) = self.step_grads.as_mut() {
            *kept = vec![None; kept.len()];
        }
        Ok(())
    }
}

/// LoRA+ (Hayou et al. 2024), as PEFT's `create_loraplus_optimizer` sets it up: the `B` factors
/// (`lora_B` in the name) learn `ratio` times faster than everything else, and so do DoRA's
/// magnitudes (PEFT puts every 1-d parameter in `B`'s group). Hand it to
/// [`Trainer::set_lr_scales`].
///
/// ```
/// let scale = lora_runtime::train::loraplus(16.0);
/// assert_eq!(scale("base_model.model.q_proj.lora_B.weight"), 16.0);
/// assert_eq!(scale("base_model.model.q_proj.lora_magnitude_vector"), 16.0);
/// assert_eq!(scale("base_model.model.q_proj.lora_A.weight"), 1.0);
/// ```
pub fn loraplus(ratio: f64) -> impl Fn(&str) -> f64 {
    move |name: &str| {
        if name.contains("lora_B") || name.contains("lora_magnitude_vector") {
            ratio
        } else {
            1.0
        }
    }
}

/// The tensors (on the CPU) and the metadata of the safetensors file `path`.
///
/// # Errors
/// [`Error::Io`], [`Error::SafeTensors`] naming the file.
pub(crate) fn read_safetensors(
    path: &Path,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| Error::SafeTensors {
            path: path.to_path_buf(),
            source,
        })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    Ok((tensors, metadata))
}

/// Writes `tensors` to the safetensors file `path` with `metadata`, atomically (a temporary file
/// renamed over it): what checkpoints of full fine-tuning use for the model weights.
///
/// # Errors
/// [`Error::Io`] naming the file; [`Error::BadTensor`] for a dtype safetensors cannot hold here.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let bytes = serialize_tensors(tensors, metadata, path)?;
    let mut staging = Staging::new(&RealFs);
    staging.write(path, &bytes)?;
    staging.commit()
}
