//! [`LoraModel`]: the seam between `#[lora]` and the runtime.
//!
//! A model implements two visitors (shared and mutable) that hand every LoRA layer to a callback
//! together with its module path and hyper-parameters; `#[lora]` writes them. Everything else,
//! from `init_adapter` to `save_adapter`, is a default method built on the visitors.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_nn::VarMap;
//! use lora_runtime::{LayerConfig, LoraLinear, LoraModel, ModulePath, VisitFn, VisitMutFn};
//!
//! // What `#[lora(rank = 4, alpha = 8, targets = ["q_proj"])]` generates, by hand.
//! struct Attention { q_proj: LoraLinear }
//! const CONFIG: LayerConfig = LayerConfig::new(4, 8.0);
//! impl LoraModel for Attention {
//!     fn visit_lora_layers<'a>(&'a self, path: &mut ModulePath, f: &mut VisitFn<'a, '_>) -> lora_runtime::Result<()> {
//!         path.scoped("q_proj", |p| f(p, &self.q_proj, &CONFIG))
//!     }
//!     fn visit_lora_layers_mut(&mut self, path: &mut ModulePath, f: &mut VisitMutFn<'_>) -> lora_runtime::Result<()> {
//!         path.scoped("q_proj", |p| f(p, &mut self.q_proj, &CONFIG))
//!     }
//! }
//!
//! let w = Tensor::randn(0f32, 1., (8, 8), &Device::Cpu)?;
//! let mut layers = vec![Attention { q_proj: LoraLinear::new(w.clone(), None) },
//!                       Attention { q_proj: LoraLinear::new(w, None) }];
//! let varmap = VarMap::new();
//! layers.init_adapter(&varmap)?;
//! assert_eq!(layers.trainable_vars().len(), 4);
//! let paths: Vec<String> = layers.lora_layers().into_iter().map(|(p, _, _)| p).collect();
//! assert_eq!(paths, ["0.q_proj", "1.q_proj"]);
//! assert_eq!(
//!     layers.trainable_parameters().to_string(),
//!     "trainable params: 128 || all params: 256 || trainable%: 50.0000"
//! );
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use candle_core::Var;
use candle_nn::VarMap;

use crate::config::{LayerConfig, LoraConfig};
use crate::error::{Error, Result};
use crate::linear::{Adapter, LoraLinear, DEFAULT_ADAPTER};
use crate::peft;

/// The dotted module path of a layer, e.g. `model.layers.0.self_attn.q_proj`, as PyTorch names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModulePath(String);

impl ModulePath {
    /// The empty path (the model's root).
    pub fn new() -> Self {
        Self::default()
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `f` with `segment` appended, then removes it again.
    pub fn scoped<R>(&mut self, segment: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        let len = self.0.len();
        if !self.0.is_empty() {
            self.0.push('.');
        }
        self.0.push_str(segment);
        let out = f(self);
        self.0.truncate(len);
        out
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ModulePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The callback of [`LoraModel::visit_lora_layers`]: module path, layer, its hyper-parameters.
pub type VisitFn<'a, 'f> = dyn FnMut(&ModulePath, &'a LoraLinear, &LayerConfig) -> Result<()> + 'f;

/// The callback of [`LoraModel::visit_lora_layers_mut`].
pub type VisitMutFn<'f> = dyn FnMut(&ModulePath, &mut LoraLinear, &LayerConfig) -> Result<()> + 'f;

/// The seed [`LoraModel::init_adapter`] uses; see [`LoraModel::init_adapter_seeded`].
pub const DEFAULT_SEED: u64 = 0x10_0A;

/// Trainable and total parameter counts, printed as PEFT's `print_trainable_parameters` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableParameters {
    /// Parameters of the adapters (`A` and `B`).
    pub trainable: usize,
    /// Trainable plus frozen parameters.
    pub total: usize,
}

impl TrainableParameters {
    /// The trainable share in percent.
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        }
    }

    /// The same counts with `frozen` more frozen parameters (the layers outside the LoRA
    /// targets, which the visitor does not see: embeddings, norms, other linears).
    pub fn with_frozen(self, frozen: usize) -> Self {
        Self {
            trainable: self.trainable,
            total: self.total + frozen,
        }
    }
}

impl fmt::Display for TrainableParameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.total),
            self.percent()
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The PEFT name of a factor: `base_model.model.<path>.lora_A.weight`.
pub(crate) fn peft_key(path: &str, factor: &str) -> String {
    format!("base_model.model.{path}.{factor}.weight")
}

fn layer_seed(seed: u64, path: &str) -> u64 {
    // FNV-1a over the path, mixed with the seed: each layer gets its own stream, independent of
    // the order in which layers are visited.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in path.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A model with LoRA layers. `#[lora]` implements the two visitors; everything else is provided.
///
/// Operations on the whole model are all-or-nothing: they check every layer first and change
/// nothing when one fails.
///
/// # Concurrency
///
/// Models are `Send + Sync` (their tensors are reference-counted and immutable), so threads can
/// run forwards on one shared `&model` and get exactly the single-threaded results. Everything
/// that changes a model (`merge`, `unmerge`, `load_adapter`, `init_adapter`, ...) takes
/// `&mut self`, so it cannot run while any thread reads the model:
///
/// ```compile_fail,E0502
/// # use candle_core::{DType, Device, Module, Tensor};
/// # use lora_runtime::{LayerConfig, LoraLinear, LoraModel};
/// # let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
/// let mut model = LoraLinear::new(w.clone(), None);
/// std::thread::scope(|s| {
///     s.spawn(|| model.forward(&w));
///     model.merge() // error[E0502]: cannot borrow `model` as mutable, it is borrowed by the thread
/// });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a LoRA model",
    label = "`{Self}` has no `#[lora]` attribute",
    note = "add `#[lora]` to the definition of `{Self}`, or remove `#[lora(nested)]` from this field"
)]
pub trait LoraModel {
    /// Calls `f` on every LoRA layer, with its full module path (below `path`) and
    /// hyper-parameters, in a fixed order.
    ///
    /// # Errors
    /// The first error `f` returns.
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()>;

    /// Mutable twin of [`visit_lora_layers`](Self::visit_lora_layers), in the same order.
    ///
    /// # Errors
    /// The first error `f` returns.
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()>;

    /// Every LoRA layer with its module path and hyper-parameters.
    fn lora_layers(&self) -> Vec<(String, &LoraLinear, LayerConfig)> {
        let mut out = Vec::new();
        // The callback never fails, so neither does the visit.
        let _ = self.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, c| {
            out.push((p.to_string(), l, *c));
            Ok(())
        });
        out
    }

    /// Gives every LoRA layer a fresh adapter with the rank, alpha, dropout, scaling and init
    /// its struct declares, and registers `A` and `B` in `varmap` under their PEFT names
    /// (`base_model.model.<path>.lora_A.weight`). Uses [`DEFAULT_SEED`].
    ///
    /// # Errors
    /// See [`init_adapter_seeded`](Self::init_adapter_seeded).
    fn init_adapter(&mut self, varmap: &VarMap) -> Result<()> {
        self.init_adapter_seeded(varmap, DEFAULT_SEED)
    }

    /// [`init_adapter`](Self::init_adapter) with a seed: each layer draws from its own generator
    /// seeded by `seed` and its module path, so the result does not depend on visiting order.
    ///
    /// # Errors
    /// [`Error::Merged`] when the model is merged, [`Error::NoAdapter`] when it has no LoRA
    /// layers, [`Error::InvalidConfig`] for invalid hyper-parameters. Nothing changes on error.
    fn init_adapter_seeded(&mut self, varmap: &VarMap, seed: u64) -> Result<()> {
        init_adapters(self, varmap, None, seed, None)
    }

    /// Adds a fresh adapter called `name` to every LoRA layer (hyper-parameters as the structs
    /// declare, [`DEFAULT_SEED`] mixed with the name), registered in `varmap` under PEFT's
    /// state-dict names (`...lora_A.<name>.weight`). It does not become active: see
    /// [`set_active_adapter`](Self::set_active_adapter).
    ///
    /// # Errors
    /// As [`init_adapter_seeded`](Self::init_adapter_seeded); [`Error::InvalidConfig`] when an
    /// adapter called `name` exists already.
    fn init_adapter_as(&mut self, varmap: &VarMap, name: &str) -> Result<()> {
        if all_adapter_names(self).iter().any(|n| n == name) {
            return Err(Error::InvalidConfig {
                file: None,
                field: "adapter name".into(),
                reason: format!(
                    "an adapter called `{name}` exists already: `delete_adapter` it first"
                ),
            });
        }
        init_adapters(
            self,
            varmap,
            None,
            layer_seed(DEFAULT_SEED, name),
            Some(name),
        )
    }

    /// The names of the model's adapters, sorted.
    fn adapters(&self) -> Vec<String> {
        all_adapter_names(self)
    }

    /// The name of the active adapter (`None`: the base model alone).
    fn active_adapter(&self) -> Option<String> {
        self.lora_layers()
            .first()
            .and_then(|(_, l, _)| l.active_adapter_name().map(str::to_string))
    }

    /// Makes `name` the adapter every forward, merge and training step uses; `None` runs the
    /// base model alone. Switching copies no weights (adapters are kept per layer by name).
    ///
    /// Switching while merged is refused, so a merged delta is never left in the weights of
    /// another adapter: call [`unmerge`](Self::unmerge) first.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for a name the model does not have (never a silent fallback to
    /// the base), [`Error::Merged`] when merged.
    fn set_active_adapter(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            let known = all_adapter_names(self);
            if !known.iter().any(|k| k == n) {
                return Err(unknown_adapter(n, known));
            }
        }
        refuse_if_merged(self)?;
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            l.activate(name);
            Ok(())
        })
    }

    /// Removes the adapter `name` from every layer. If it was active, the model runs the base
    /// alone afterwards.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for an unknown name, [`Error::Merged`] when merged.
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        let known = all_adapter_names(self);
        if !known.iter().any(|k| k == name) {
            return Err(unknown_adapter(name, known));
        }
        refuse_if_merged(self)?;
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            l.install_named(name, None);
            Ok(())
        })
    }

    /// Loads a PEFT adapter directory as the adapter `name` (see
    /// [`load_adapter`](Self::load_adapter) for what is checked), without making it active. An
    /// adapter of that name is replaced.
    ///
    /// # Errors
    /// As [`load_adapter`](Self::load_adapter).
    fn load_adapter_as(&mut self, dir: impl AsRef<Path>, name: &str) -> Result<()> {
        load_into(self, dir.as_ref(), &LoadOptions::default(), Some(name))
    }

    /// Combines adapters into a new adapter `new_name` (not made active): for every layer, the
    /// weighted sum `sum_i w_i s_i B_i A_i` of the named adapters' deltas, exactly (`Cat`, or
    /// `Svd` with enough rank) or approximately (`Linear`, `Svd` with less rank); see
    /// [`Combination`](crate::Combination). Works with any mix of rsLoRA and plain adapters,
    /// since each adapter's own scaling is folded in. A layer without some of the adapters
    /// combines those it has.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for an unknown name, [`Error::InvalidConfig`] for an empty list
    /// or an existing `new_name`, [`Error::Layer`] for `Linear` with unequal ranks.
    fn add_weighted_adapter(
        &mut self,
        parts: &[(&str, f64)],
        how: crate::Combination,
        new_name: &str,
    ) -> Result<()> {
        let known = all_adapter_names(self);
        if parts.is_empty() {
            return Err(Error::InvalidConfig {
                file: None,
                field: "adapters".into(),
                reason: "no adapters to combine".into(),
            });
        }
        for (name, w) in parts {
            if !known.iter().any(|k| k == name) {
                return Err(unknown_adapter(name, known));
            }
            if !w.is_finite() {
                return Err(Error::InvalidConfig {
                    file: None,
                    field: "weight".into(),
                    reason: format!("the weight of `{name}` must be finite, got {w}"),
                });
            }
        }
        if known.iter().any(|k| k == new_name) {
            return Err(Error::InvalidConfig {
                file: None,
                field: "new_name".into(),
                reason: format!("an adapter called `{new_name}` exists already"),
            });
        }
        let mut combined: Vec<Option<Adapter>> = Vec::new();
        self.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, _| {
            let present: Vec<(&Adapter, f64)> = parts
                .iter()
                .filter_map(|(n, w)| l.adapter_named(n).map(|a| (a, *w)))
                .collect();
            if present.is_empty() {
                combined.push(None);
                return Ok(());
            }
            let (a, b) = crate::combine::combine(&present, how, p.as_str())?;
            let dtype = l.adapter_dtype();
            let rank = a.dim(0)?;
            let dropout = present
                .iter()
                .map(|(ad, _)| ad.dropout())
                .fold(0.0, f32::max);
            let a = Var::from_tensor(&a.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&b.to_dtype(dtype)?)?;
            // alpha = r and no rsLoRA: scaling 1, the weights and scalings are in B already.
            combined.push(Some(Adapter::new(a, b, rank as f64, false, dropout)?));
            Ok(())
        })?;
        let mut combined = combined.into_iter();
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            if let Some(Some(ad)) = combined.next() {
                l.install_named(new_name, Some(ad));
            }
            Ok(())
        })
    }

    /// Routes the rows of the next forwards through different adapters: row `i` of every LoRA
    /// layer's input uses the adapter `rows[i]` (`None`: the base alone), all rows in one pass
    /// (stacked factors gathered per row and batched matmuls, the BGMV idea, instead of a loop
    /// of sub-batches). The model's own `forward` stays as it is: the assignment is carried by
    /// the layers until `set_batch_adapters(None)`. The factors are snapshotted now, so call it
    /// again after changing adapters. Inference only: training forwards are refused while set,
    /// and merging clears it.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for an unknown name, [`Error::Merged`] when merged.
    fn set_batch_adapters(&mut self, rows: Option<&[Option<&str>]>) -> Result<()> {
        let Some(rows) = rows else {
            return self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
                l.set_routing(None);
                Ok(())
            });
        };
        let known = all_adapter_names(self);
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|n| !known.iter().any(|k| k == *n))
        {
            return Err(unknown_adapter(bad, known));
        }
        refuse_if_merged(self)?;
        let mut routings = Vec::new();
        self.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, _| {
            // A layer without one of the adapters runs the base for those rows.
            let names = l.adapter_names();
            let local: Vec<Option<&str>> = rows
                .iter()
                .map(|r| r.filter(|n| names.contains(n)))
                .collect();
            routings.push(l.routing_for(&local, p.as_str())?);
            Ok(())
        })?;
        let mut routings = routings.into_iter();
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            l.set_routing(routings.next());
            Ok(())
        })
    }

    /// [`init_adapter_seeded`](Self::init_adapter_seeded) with `config` for every layer instead of
    /// the hyper-parameters the structs declare: for choosing rank or alpha at run time.
    ///
    /// # Errors
    /// See [`init_adapter_seeded`](Self::init_adapter_seeded).
    fn init_adapter_with(
        &mut self,
        varmap: &VarMap,
        config: &LayerConfig,
        seed: u64,
    ) -> Result<()> {
        init_adapters(self, varmap, Some(config), seed, None)
    }

    /// The variables to hand to the optimizer: `A` and `B` of every adapter, nothing else.
    fn trainable_vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for (_, l, _) in self.lora_layers() {
            if let Some(ad) = l.adapter() {
                vars.push(ad.a().clone());
                vars.push(ad.b().clone());
            }
        }
        vars
    }

    /// Trainable (adapter) and total parameters of the LoRA layers, printed like PEFT's
    /// `print_trainable_parameters`. Add the rest of the model with
    /// [`TrainableParameters::with_frozen`].
    fn trainable_parameters(&self) -> TrainableParameters {
        let mut counts = TrainableParameters {
            trainable: 0,
            total: 0,
        };
        for (_, l, _) in self.lora_layers() {
            let base = l.weight().elem_count() + l.bias().map_or(0, |b| b.elem_count());
            let adapter = l.adapter().map_or(0, Adapter::num_parameters);
            counts.trainable += adapter;
            counts.total += base + adapter;
        }
        counts
    }

    /// Folds every adapter into its weight (see [`LoraLinear::merge`]): afterwards the forward
    /// costs exactly the base model's. All-or-nothing.
    ///
    /// # Errors
    /// [`Error::Merged`] when a layer is already merged, [`Error::NoAdapter`] when no layer has
    /// an adapter, [`Error::NonFinite`] when a merged weight would be NaN or inf. Nothing changes
    /// on error.
    fn merge(&mut self) -> Result<()> {
        let mut merged = Vec::new();
        self.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, _| {
            if l.is_merged() {
                return Err(Error::Merged {
                    path: p.to_string(),
                });
            }
            merged.push(match l.adapter() {
                Some(_) => Some(l.merged_weight(p.as_str())?),
                None => None,
            });
            Ok(())
        })?;
        if merged.iter().all(Option::is_none) {
            return Err(Error::NoAdapter(
                "no LoRA layer has an adapter: nothing to merge".into(),
            ));
        }
        let mut merged = merged.into_iter();
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            if let Some(Some(w)) = merged.next() {
                l.commit_merge(w);
            }
            Ok(())
        })
    }

    /// Restores every merged weight bit for bit.
    ///
    /// # Errors
    /// [`Error::NotMerged`] when no layer is merged.
    fn unmerge(&mut self) -> Result<()> {
        if !self.is_merged() {
            return Err(Error::NotMerged {
                path: "<model>".into(),
            });
        }
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            if l.is_merged() {
                l.unmerge()?;
            }
            Ok(())
        })
    }

    /// Merges every adapter and drops the adapters and original weights: a plain model with no
    /// LoRA overhead in time or memory. Not reversible.
    ///
    /// # Errors
    /// As [`merge`](Self::merge) (an already merged model is fine).
    fn merge_and_unload(&mut self) -> Result<()> {
        if !self.is_merged() {
            self.merge()?;
        }
        self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| l.merge_and_unload())
    }

    /// Puts every LoRA layer in training mode (dropout on the LoRA branch) or inference mode,
    /// like PyTorch's `model.train()` / `model.eval()`.
    fn set_training(&mut self, training: bool) {
        // The callback never fails, so neither does the visit.
        let _ = self.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
            l.set_training(training);
            Ok(())
        });
    }

    /// Whether any LoRA layer is merged.
    fn is_merged(&self) -> bool {
        self.lora_layers().iter().any(|(_, l, _)| l.is_merged())
    }

    /// The `adapter_config.json` that [`save_adapter`](Self::save_adapter) writes: the most
    /// common rank and alpha as `r` / `lora_alpha`, the others as `rank_pattern` /
    /// `alpha_pattern` by full module path.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no layer has an adapter.
    fn adapter_config(&self) -> Result<LoraConfig> {
        let layers = self.lora_layers();
        let adapters: Vec<(&str, &Adapter, bool)> = layers
            .iter()
            .filter_map(|(p, l, _)| l.adapter().map(|a| (p.as_str(), a, l.fan_in_fan_out())))
            .collect();
        peft::config_for(&adapters)
    }

    /// Writes the adapters in PEFT's format: `DIR/adapter_model.safetensors` (only `A` and `B`,
    /// metadata `format: pt`) and `DIR/adapter_config.json`, creating `DIR` if needed. The
    /// metadata also records, under `lora.base_fingerprint.<module path>`, the shape, dtype
    /// and hash of each target's unmerged base weight (see
    /// [`BaseFingerprint`](crate::peft::BaseFingerprint)), which
    /// [`load_adapter`](Self::load_adapter) checks; PEFT ignores these entries.
    ///
    /// Both files are written to temporary files and synced first, then renamed over the old
    /// ones; if anything fails the previous adapter is put back and the temporary files are
    /// removed, so a failed save leaves any previous adapter intact.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] without adapters, [`Error::Io`] naming the file on I/O failure.
    fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let layers = self.lora_layers();
        let names = all_adapter_names(self);
        if names.is_empty() {
            return Err(Error::NoAdapter(
                "no LoRA layer has an adapter: nothing to save".into(),
            ));
        }
        for name in &names {
            let adapters: Vec<(&str, &LoraLinear, &Adapter)> = layers
                .iter()
                .filter_map(|(p, l, _)| l.adapter_named(name).map(|a| (p.as_str(), *l, a)))
                .collect();
            // PEFT's layout: the default adapter at the root, the others in sub-directories.
            let target = if name == DEFAULT_ADAPTER {
                dir.as_ref().to_path_buf()
            } else {
                dir.as_ref().join(name)
            };
            peft::save(&target, &adapters)?;
        }
        Ok(())
    }

    /// Loads a PEFT adapter directory (or an `adapter_model.safetensors` file next to its
    /// `adapter_config.json`). Keys may carry the `base_model.model.` prefix or not, and an
    /// adapter-name infix (`lora_A.default.weight`). Ranks and alphas come from the file.
    ///
    /// Every tensor is validated against the model first (known module, shape, dtype, finite
    /// values, ranks of `A`, `B` and the config agree, and the base-weight fingerprints that
    /// [`save_adapter`](Self::save_adapter) records match this model's weights); only then are
    /// the layers changed, so a bad file leaves the model exactly as it was. LoRA layers the
    /// file does not mention are left without adapter. Adapters without fingerprints (PEFT's)
    /// load without the base check; to skip it for adapters that have them, use
    /// [`load_adapter_with`](Self::load_adapter_with).
    ///
    /// # Errors
    /// [`Error::Merged`] when the model is merged; [`Error::Io`], [`Error::TooLarge`],
    /// [`Error::SafeTensors`], [`Error::Json`], [`Error::Unsupported`],
    /// [`Error::InvalidConfig`], [`Error::BadTensor`], [`Error::BadMetadata`],
    /// [`Error::UnknownModule`], [`Error::BaseMismatch`] or [`Error::Layer`] naming the file,
    /// key or module at fault.
    fn load_adapter(&mut self, dir: impl AsRef<Path>) -> Result<()> {
        self.load_adapter_with(dir, &LoadOptions::default())
    }

    /// [`load_adapter`](Self::load_adapter) with options, e.g. without the base-weight check:
    ///
    /// ```no_run
    /// # use lora_runtime::{LoadOptions, LoraLinear, LoraModel};
    /// # fn f(model: &mut LoraLinear) -> lora_runtime::Result<()> {
    /// // The adapter was trained on a sibling checkpoint with the same architecture.
    /// model.load_adapter_with("adapter", &LoadOptions::default().with_verify_base(false))?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`load_adapter`](Self::load_adapter).
    fn load_adapter_with(&mut self, dir: impl AsRef<Path>, options: &LoadOptions) -> Result<()> {
        load_into(self, dir.as_ref(), options, None)
    }
}

/// Loads the adapter at `dir` into `model` as the default adapter (made active) or as `name`.
fn load_into<M: LoraModel + ?Sized>(
    model: &mut M,
    dir: &Path,
    options: &LoadOptions,
    name: Option<&str>,
) -> Result<()> {
    let file = peft::AdapterFile::read(dir)?;
    let layers = model.lora_layers();
    if let Some((p, _, _)) = layers.iter().find(|(_, l, _)| l.is_merged()) {
        return Err(Error::Merged { path: p.clone() });
    }
    let targets: Vec<(&str, &LoraLinear)> =
        layers.iter().map(|(p, l, _)| (p.as_str(), *l)).collect();
    if options.verify_base {
        file.verify_base(&targets)?;
    }
    let mut adapters = file.into_adapters(&targets)?;
    drop(layers);
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |p, l, _| {
        let ad = adapters.remove(p.as_str());
        match name {
            None => l.install_adapter(ad),
            Some(n) => l.install_named(n, ad),
        }
        Ok(())
    })
}

/// Options of [`LoraModel::load_adapter_with`].
///
/// ```
/// use lora_runtime::LoadOptions;
/// assert!(LoadOptions::default().verify_base);
/// assert!(!LoadOptions::default().with_verify_base(false).verify_base);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Compare the base-weight fingerprints recorded in the file (see
    /// [`BaseFingerprint`](crate::peft::BaseFingerprint)) with the model's weights and refuse a
    /// mismatch with [`Error::BaseMismatch`]. On by default; files without fingerprints pass.
    pub verify_base: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { verify_base: true }
    }
}

impl LoadOptions {
    /// Switches the base-weight check on or off.
    pub const fn with_verify_base(mut self, verify_base: bool) -> Self {
        self.verify_base = verify_base;
        self
    }
}

fn init_adapters<M: LoraModel + ?Sized>(
    model: &mut M,
    varmap: &VarMap,
    config: Option<&LayerConfig>,
    seed: u64,
    name: Option<&str>,
) -> Result<()> {
    let mut fresh: Vec<(String, Adapter)> = Vec::new();
    model.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, c| {
        if l.is_merged() {
            return Err(Error::Merged {
                path: p.to_string(),
            });
        }
        let ad = l
            .fresh_adapter(config.unwrap_or(c), layer_seed(seed, p.as_str()))
            .map_err(|e| match e {
                Error::Layer { reason, .. } => Error::layer(p.as_str(), reason),
                e => e,
            })?;
        fresh.push((p.to_string(), ad));
        Ok(())
    })?;
    if fresh.is_empty() {
        return Err(Error::NoAdapter("the model has no LoRA layers".into()));
    }
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::NoAdapter("the VarMap's lock is poisoned".into()))?;
        for (path, ad) in &fresh {
            // PEFT's state-dict names: the adapter name sits between the factor and `weight`,
            // except for the default adapter in files.
            let (ka, kb) = match name {
                None => (peft_key(path, "lora_A"), peft_key(path, "lora_B")),
                Some(n) => (
                    peft_key(path, &format!("lora_A.{n}")),
                    peft_key(path, &format!("lora_B.{n}")),
                ),
            };
            data.insert(ka, ad.a().clone());
            data.insert(kb, ad.b().clone());
        }
    }
    let mut fresh = fresh.into_iter();
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
        if let Some((_, ad)) = fresh.next() {
            match name {
                None => l.install_adapter(Some(ad)),
                Some(n) => l.install_named(n, Some(ad)),
            }
        }
        Ok(())
    })
}

/// The adapter names of every layer, sorted and deduplicated.
fn all_adapter_names<M: LoraModel + ?Sized>(model: &M) -> Vec<String> {
    let mut names: Vec<String> = model
        .lora_layers()
        .iter()
        .flat_map(|(_, l, _)| {
            l.adapter_names()
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn unknown_adapter(name: &str, known: Vec<String>) -> Error {
    Error::UnknownAdapter {
        name: name.to_string(),
        known,
    }
}

fn refuse_if_merged<M: LoraModel + ?Sized>(model: &M) -> Result<()> {
    match model.lora_layers().iter().find(|(_, l, _)| l.is_merged()) {
        Some((p, _, _)) => Err(Error::Merged { path: p.clone() }),
        None => Ok(()),
    }
}

impl LoraModel for LoraLinear {
    /// Visits the layer itself at `path`, with PEFT's default hyper-parameters.
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        f(path, self, &LayerConfig::default())
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        f(path, self, &LayerConfig::default())
    }
}

macro_rules! forward_through {
    ($($ty:ty),*) => {$(
        impl<T: LoraModel> LoraModel for $ty {
            fn visit_lora_layers<'a>(&'a self, path: &mut ModulePath, f: &mut VisitFn<'a, '_>) -> Result<()> {
                match self.as_ref() {
                    Some(inner) => inner.visit_lora_layers(path, f),
                    None => Ok(()),
                }
            }
            fn visit_lora_layers_mut(&mut self, path: &mut ModulePath, f: &mut VisitMutFn<'_>) -> Result<()> {
                match self.as_mut() {
                    Some(inner) => inner.visit_lora_layers_mut(path, f),
                    None => Ok(()),
                }
            }
        }
    )*};
}

forward_through!(Option<T>);

impl<T: LoraModel + ?Sized> LoraModel for Box<T> {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        (**self).visit_lora_layers(path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        (**self).visit_lora_layers_mut(path, f)
    }
}

/// List elements take their index as path segment, like PyTorch's `ModuleList`.
fn visit_slice<'a, T: LoraModel>(
    items: &'a [T],
    path: &mut ModulePath,
    f: &mut VisitFn<'a, '_>,
) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        path.scoped(&i.to_string(), |p| item.visit_lora_layers(p, f))?;
    }
    Ok(())
}

fn visit_slice_mut<T: LoraModel>(
    items: &mut [T],
    path: &mut ModulePath,
    f: &mut VisitMutFn<'_>,
) -> Result<()> {
    for (i, item) in items.iter_mut().enumerate() {
        path.scoped(&i.to_string(), |p| item.visit_lora_layers_mut(p, f))?;
    }
    Ok(())
}

impl<T: LoraModel> LoraModel for Vec<T> {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        visit_slice(self, path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        visit_slice_mut(self, path, f)
    }
}

impl<T: LoraModel, const N: usize> LoraModel for [T; N] {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        visit_slice(self, path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        visit_slice_mut(self, path, f)
    }
}
