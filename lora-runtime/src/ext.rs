//! [`LoraModelExt`]: the verbs of every [`LoraModel`], as futures' `StreamExt` is to `Stream`.
//!
//! Implemented for every `LoraModel` (including a single [`LoraLinear`](crate::LoraLinear)) and
//! exported in the prelude. Each verb is one call into the module that owns the work:
//! [`crate::registry`] (create, activate, delete, train), [`crate::merge`],
//! [`crate::combine`], [`crate::batched`] and [`crate::peft`] (files).
//! Operations on the whole model are all-or-nothing: they check every layer first and change
//! nothing when one fails.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::VarMap;
//! use lora_runtime::{LoraLinear, LoraModelExt};
//!
//! let w = Tensor::randn(0f32, 1., (8, 8), &Device::Cpu)?;
//! let mut layer = LoraLinear::new(w.clone(), None); // one layer is a model of its own
//! layer.init_adapter(&VarMap::new())?;
//! layer.adapter().unwrap().b().set(&Tensor::ones((8, 8), candle_core::DType::F32, &Device::Cpu)?)?;
//! let x = Tensor::randn(0f32, 1., (2, 8), &Device::Cpu)?;
//! let before = layer.forward(&x)?;
//! layer.merge()?;
//! assert!(layer.is_merged());
//! layer.unmerge()?;
//! assert_eq!(layer.weight()?.to_vec2::<f32>()?, w.to_vec2::<f32>()?); // bit for bit
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, before.to_vec2::<f32>()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use candle_core::Var;
use candle_nn::VarMap;

use crate::combine::Combination;
use crate::config::{LayerConfig, LoraConfig};
use crate::error::Result;
use crate::layer::LoraLayer;
use crate::model::{self, LoraModel};
use crate::peft::{self, LoadOptions, SaveOptions};
use crate::registry::{self, InitOptions, TrainableParameters};
use crate::rng::DropoutRng;
use crate::{batched, combine, merge};

/// The verbs of a LoRA model: adapters, merge, files. See the [module docs](self).
pub trait LoraModelExt: LoraModel {
    /// Every LoRA layer with its module path and the hyper-parameters of its default adapter
    /// (`None` for layers declared `adaptable`), in visiting order.
    fn lora_layers(&self) -> Vec<(String, &dyn LoraLayer, Option<LayerConfig>)> {
        model::layers(self)
    }

    /// Gives every LoRA layer a fresh adapter `default` (made active) with the rank, alpha,
    /// dropout, scaling and init its struct declares, and registers `A` and `B` in `varmap`
    /// under their PEFT names (`base_model.model.<path>.lora_A.weight`).
    ///
    /// # Errors
    /// See [`init_adapter_with`](Self::init_adapter_with).
    fn init_adapter(&mut self, varmap: &VarMap) -> Result<()> {
        self.init_adapter_with(varmap, &InitOptions::default())
    }

    /// [`init_adapter`](Self::init_adapter) with options: hyper-parameters chosen at run time,
    /// a seed, or a name for an additional adapter (registered under PEFT's state-dict names,
    /// `...lora_A.<name>.weight`, and not made active).
    ///
    /// # Errors
    /// [`Error::Merged`](crate::Error::Merged) when the model is merged,
    /// [`Error::NoLoraLayers`](crate::Error::NoLoraLayers),
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for invalid hyper-parameters or an
    /// existing name, [`Error::LockPoisoned`](crate::Error::LockPoisoned). Nothing changes on
    /// error.
    fn init_adapter_with(&mut self, varmap: &VarMap, options: &InitOptions) -> Result<()> {
        registry::init_adapter(self, varmap, options)
    }

    /// The names of the model's adapters, sorted.
    fn adapters(&self) -> Vec<String> {
        model::adapter_names(self)
    }

    /// The name of the active adapter (`None`: the base model alone).
    fn active_adapter(&self) -> Option<String> {
        registry::active_adapter(self)
    }

    /// Makes `name` the adapter every forward, merge and training step uses; `None` runs the
    /// base model alone. Switching copies no weights. Refused while merged, so a merged delta is
    /// never left in the weights of another adapter.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`](crate::Error::UnknownAdapter) (never a silent fallback to the
    /// base), [`Error::Merged`](crate::Error::Merged).
    fn set_active_adapter(&mut self, name: Option<&str>) -> Result<()> {
        registry::set_active_adapter(self, name)
    }

    /// Removes the adapter `name` from every layer; if it was active, the model runs the base
    /// alone afterwards.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`](crate::Error::UnknownAdapter),
    /// [`Error::Merged`](crate::Error::Merged).
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        registry::delete_adapter(self, name)
    }

    /// Combines adapters into a new adapter `new_name` (not made active): for every layer, the
    /// weighted sum `sum_i w_i s_i B_i A_i` of the named adapters' deltas, exactly (`Cat`, or
    /// `Svd` with enough rank) or approximately (`Linear`, `Svd` with less rank); see
    /// [`Combination`]. Each adapter's own scaling is folded in, so rsLoRA and plain adapters
    /// mix. A layer without some of the adapters combines those it has.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`](crate::Error::UnknownAdapter),
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for an empty list, a non-finite
    /// weight or an existing `new_name`, [`Error::Layer`](crate::Error::Layer) for `Linear` with
    /// unequal ranks.
    fn add_weighted_adapter(
        &mut self,
        parts: &[(&str, f64)],
        how: Combination,
        new_name: &str,
    ) -> Result<()> {
        combine::add_weighted_adapter(self, parts, how, new_name)
    }

    /// Routes the rows of the next forwards through different adapters: row `i` of every LoRA
    /// layer's input uses the adapter `rows[i]` (`None`: the base alone), all rows in one pass
    /// (each layer's adapters stacked once, a per-row mask selecting each row's block, two
    /// dense matmuls, the second accumulated into the base output; instead of a loop of
    /// sub-batches). The model's own `forward` stays as it is: the assignment is carried by the
    /// layers until `set_batch_adapters(None)`. The factors are snapshotted when routing starts
    /// and the stacks are reused while it stays on, so a new assignment every decoding step only
    /// rebuilds the masks; adding or deleting an adapter restacks, and after changing factors
    /// in place call `set_batch_adapters(None)` first. Inference only: training forwards are
    /// refused while set, and merging clears it.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`](crate::Error::UnknownAdapter),
    /// [`Error::Merged`](crate::Error::Merged).
    fn set_batch_adapters(&mut self, rows: Option<&[Option<&str>]>) -> Result<()> {
        batched::set_batch_adapters(self, rows)
    }

    /// The variables to hand to the optimizer: `A` and `B` of every active adapter (and the
    /// magnitude of a DoRA adapter), nothing else.
    fn trainable_vars(&self) -> Vec<Var> {
        registry::trainable_vars(self)
    }

    /// Trainable (adapter) and total parameters of the LoRA layers, printed like PEFT's
    /// `print_trainable_parameters`. Add the rest of the model with
    /// [`TrainableParameters::with_frozen`].
    fn trainable_parameters(&self) -> TrainableParameters {
        TrainableParameters::of(self)
    }

    /// `A` and `B` (and DoRA's magnitude) of every active adapter with the names PEFT's file
    /// gives them (`<module path>.lora_A.weight`, `<module path>.lora_magnitude_vector`): what [`Trainer`](crate::train::Trainer) saves its
    /// optimizer state under.
    fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        registry::named_trainable_vars(self)
    }

    /// Makes training-mode dropout draw its masks from `rng` (shared by every layer) instead of
    /// candle's unseeded generator, so a seeded run is reproducible bit for bit; `None` goes back
    /// to candle's.
    fn set_dropout_rng(&mut self, rng: Option<&DropoutRng>) {
        registry::set_dropout_rng(self, rng);
    }

    /// Puts every LoRA layer in training mode (dropout on the LoRA branch) or inference mode,
    /// like PyTorch's `model.train()` / `model.eval()`.
    fn set_training(&mut self, training: bool) {
        registry::set_training(self, training);
    }

    /// Folds every active adapter into its weight: afterwards the forward costs exactly the
    /// base model's. The original weights are kept for an exact [`unmerge`](Self::unmerge).
    ///
    /// # Errors
    /// [`Error::Merged`](crate::Error::Merged) when a layer is already merged,
    /// [`Error::NoAdapter`](crate::Error::NoAdapter) when no layer has an adapter,
    /// [`Error::NonFinite`](crate::Error::NonFinite) when a merged weight would be NaN or inf.
    /// Nothing changes on error.
    fn merge(&mut self) -> Result<()> {
        merge::merge(self)
    }

    /// Restores every merged weight bit for bit.
    ///
    /// # Errors
    /// [`Error::NotMerged`](crate::Error::NotMerged) when no layer is merged.
    fn unmerge(&mut self) -> Result<()> {
        merge::unmerge(self)
    }

    /// Merges every adapter and drops the adapters and original weights: a plain model with no
    /// LoRA overhead in time or memory. Not reversible.
    ///
    /// # Errors
    /// As [`merge`](Self::merge) (an already merged model is fine).
    fn merge_and_unload(&mut self) -> Result<()> {
        merge::merge_and_unload(self)
    }

    /// Whether any LoRA layer is merged.
    fn is_merged(&self) -> bool {
        merge::is_merged(self)
    }

    /// The `adapter_config.json` that [`save_adapter`](Self::save_adapter) writes for the
    /// active adapter: the most common rank and alpha as `r` / `lora_alpha`, the others as
    /// `rank_pattern` / `alpha_pattern` by full module path.
    ///
    /// # Errors
    /// [`Error::NoAdapter`](crate::Error::NoAdapter) when no layer has an active adapter.
    fn adapter_config(&self) -> Result<LoraConfig> {
        peft::adapter_config(self)
    }

    /// Writes the adapters in PEFT's format: `DIR/adapter_model.safetensors` (only `A` and `B`,
    /// metadata `format: pt`) and `DIR/adapter_config.json` for `default`, `DIR/<name>/` for
    /// every other adapter. The metadata also records, under
    /// `lora.base_fingerprint.<module path>`, the shape, dtype and hash of each target's
    /// unmerged base weight (see [`BaseFingerprint`](crate::BaseFingerprint)), which
    /// [`load_adapter`](Self::load_adapter) checks; PEFT ignores these entries.
    ///
    /// The two files are replaced together or not at all: a failed save leaves any previous
    /// adapter intact.
    ///
    /// # Errors
    /// [`Error::NoAdapter`](crate::Error::NoAdapter) without adapters,
    /// [`Error::Io`](crate::Error::Io) naming the file on I/O failure.
    fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        peft::save_adapter(self, dir.as_ref(), &SaveOptions::default())
    }

    /// [`save_adapter`](Self::save_adapter) with the config fields that describe where the
    /// adapter belongs (`task_type`, `base_model_name_or_path`), which PEFT uses to pick the
    /// model class and the base when loading with `AutoPeftModel`.
    ///
    /// # Errors
    /// As [`save_adapter`](Self::save_adapter).
    fn save_adapter_with(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<()> {
        peft::save_adapter(self, dir.as_ref(), options)
    }

    /// Loads a PEFT adapter directory (or an `adapter_model.safetensors` file next to its
    /// `adapter_config.json`) as the adapter `default`, made active. Keys may carry the
    /// `base_model.model.` prefix or not, and an adapter-name infix (`lora_A.default.weight`).
    /// Ranks and alphas come from the file.
    ///
    /// Every tensor is validated against the model first (known module, shape, dtype, finite
    /// values, ranks of `A`, `B` and the config agree, and the base-weight fingerprints that
    /// [`save_adapter`](Self::save_adapter) records match this model's weights); only then are
    /// the layers changed, so a bad file leaves the model exactly as it was. LoRA layers the
    /// file does not mention are left without that adapter.
    ///
    /// # Errors
    /// [`Error::Merged`](crate::Error::Merged) when the model is merged; an error naming the
    /// file, key or module at fault (see [`AdapterFile::read`](crate::peft::AdapterFile::read)),
    /// [`Error::UnknownModule`](crate::Error::UnknownModule),
    /// [`Error::BaseMismatch`](crate::Error::BaseMismatch).
    fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        self.load_adapter_with(dir, &LoadOptions::default())
    }

    /// [`load_adapter`](Self::load_adapter) with options: under another name, or without the
    /// base-weight check:
    ///
    /// ```no_run
    /// # use lora_runtime::{LoadOptions, LoraLinear, LoraModelExt};
    /// # fn f(model: &mut LoraLinear) -> lora_runtime::Result<()> {
    /// model.load_adapter_with("summarizer", &LoadOptions::default().with_name("sum"))?;
    /// // The adapter was trained on a sibling checkpoint with the same architecture.
    /// model.load_adapter_with("adapter", &LoadOptions::default().with_verify_base(false))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`load_adapter`](Self::load_adapter).
    fn load_adapter_with(&mut self, dir: impl AsRef<Path>, options: &LoadOptions) -> Result<()> {
        peft::load_adapter(self, dir.as_ref(), options)
    }
}

impl<M: LoraModel + ?Sized> LoraModelExt for M {}
