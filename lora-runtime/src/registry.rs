//! The adapters a model holds, by name: creating them ([`InitOptions`]), activating, deleting,
//! listing, and what training needs of them (variables, parameter counts, training mode).
//!
//! Each function here is the body of a verb of [`LoraModelExt`](crate::LoraModelExt).

use std::collections::HashMap;
use std::fmt;

use candle_core::Var;
use candle_nn::VarMap;

use crate::adapter::Adapter;
use crate::config::{LayerConfig, LoraConfig};
use crate::error::{Error, Result};
use crate::layer::install_default;
use crate::model::{adapter_names, layers, prepare_then_commit, LoraModel, ModulePath};
use crate::peft::{named_key, peft_key};
use crate::rng::DropoutRng;

/// The seed [`InitOptions::default`] uses.
pub const DEFAULT_SEED: u64 = 0x10_0A;

/// Options of [`init_adapter_with`](crate::LoraModelExt::init_adapter_with).
///
/// ```
/// use lora_runtime::{InitOptions, LayerConfig};
/// let options = InitOptions::default().with_config(LayerConfig::new(4, 8.0)).with_seed(7).with_name("task");
/// assert_eq!(options.seed, 7);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct InitOptions {
    /// Hyper-parameters for every target instead of those the structs declare: for choosing
    /// rank or alpha at run time. `adaptable` layers are chosen with
    /// [`with_peft_config`](Self::with_peft_config). `None` (the default): what each struct
    /// declares for its `targets`.
    pub config: Option<LayerConfig>,
    /// A PEFT `LoraConfig` that chooses the layers and their hyper-parameters at run time (see
    /// [`with_peft_config`](Self::with_peft_config)). Exclusive with `config`.
    pub peft_config: Option<LoraConfig>,
    /// Each layer draws from its own generator seeded by this seed and its module path (and the
    /// adapter's name), so the result does not depend on visiting order. Default
    /// [`DEFAULT_SEED`].
    pub seed: u64,
    /// Create the adapter under this name, not made active (see
    /// [`set_active_adapter`](crate::LoraModelExt::set_active_adapter)); refused if it exists.
    /// `None` (the default): the adapter `default`, made active, replacing any of that name.
    pub name: Option<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            config: None,
            peft_config: None,
            seed: DEFAULT_SEED,
            name: None,
        }
    }
}

impl InitOptions {
    /// Uses `config` for every target.
    pub fn with_config(mut self, config: LayerConfig) -> Self {
        self.config = Some(config);
        self
    }
    /// Chooses layers and hyper-parameters from a PEFT `LoraConfig`, as PEFT's
    /// `get_peft_model` does: the LoRA layers (targets and adaptable layers) that
    /// `target_modules` selects (a list of names, a regex, or `"all-linear"`: every layer but
    /// `lm_head`; minus `exclude_modules`) get an adapter with the rank and alpha of
    /// `r` / `rank_pattern` and `lora_alpha` / `alpha_pattern`, `use_rslora`, `lora_dropout`
    /// and `init_lora_weights`. Others get none.
    ///
    /// ```
    /// use lora_runtime::{InitOptions, LoraConfig};
    /// let config = LoraConfig::from_json(r#"{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}"#)?;
    /// let options = InitOptions::default().with_peft_config(config);
    /// # Ok::<(), lora_runtime::Error>(())
    /// ```
    pub fn with_peft_config(mut self, config: LoraConfig) -> Self {
        self.peft_config = Some(config);
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Creates the adapter under `name`, not made active.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// FNV-1a over `text`, mixed with `seed`: one stream per layer (and per adapter name),
/// independent of the order in which layers are visited.
fn mix_seed(seed: u64, text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Gives every LoRA layer a fresh adapter and registers `A` and `B` in `varmap` under PEFT's
/// names, all or nothing.
pub(crate) fn init_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    varmap: &VarMap,
    options: &InitOptions,
) -> Result<()> {
    if let Some(config) = &options.config {
        config.validate()?;
    }
    if let Some(peft) = &options.peft_config {
        if options.config.is_some() {
            return Err(Error::InvalidConfig {
                file: None,
                field: "InitOptions".into(),
                reason: "give either a `LayerConfig` (`with_config`) or a PEFT config \
                         (`with_peft_config`), not both"
                    .into(),
            });
        }
        peft.validate()?;
    }
    let name = options.name.as_deref();
    let seed = match name {
        None => options.seed,
        Some(n) => {
            if adapter_names(model).iter().any(|k| k == n) {
                return Err(Error::InvalidConfig {
                    file: None,
                    field: "adapter name".into(),
                    reason: format!(
                        "an adapter called `{n}` exists already: `delete_adapter` it first"
                    ),
                });
            }
            mix_seed(options.seed, n)
        }
    };
    let all = layers(model);
    if all.is_empty() {
        return Err(Error::NoLoraLayers);
    }
    // Which layers get an adapter, with which hyper-parameters: checked before anything changes.
    let mut configs: HashMap<String, LayerConfig> = HashMap::new();
    for (path, _, declared) in &all {
        let config = match (&options.config, &options.peft_config) {
            // Replaces the declared hyper-parameters: adaptable layers stay without adapter.
            (Some(config), _) => declared.map(|_| *config),
            (None, Some(peft)) if peft.targets_module(path) => Some(peft.layer_config(path)?),
            (None, Some(_)) => None,
            (None, None) => *declared,
        };
        if let Some(config) = config {
            config.validate().map_err(|e| match e {
                Error::InvalidConfig { field, reason, .. } => Error::InvalidConfig {
                    file: None,
                    field,
                    reason: format!("{reason} (layer `{path}`)"),
                },
                e => e,
            })?;
            configs.insert(path.clone(), config);
        }
    }
    if configs.is_empty() {
        return Err(match &options.peft_config {
            Some(peft) => Error::InvalidConfig {
                file: None,
                field: "target_modules".into(),
                reason: format!(
                    "{:?} matches none of the model's LoRA layers ({})",
                    peft.targets,
                    some_paths(&all)
                ),
            },
            None => Error::NoDefaultAdapter {
                layers: some_paths(&all),
            },
        });
    }
    drop(all);
    // Lock first: a poisoned lock must be found before any layer changes.
    let mut vars = varmap.data().lock().map_err(|_| Error::LockPoisoned {
        what: "the VarMap".into(),
    })?;
    prepare_then_commit(
        model,
        |path, layer, _| {
            if layer.is_merged() {
                return Err(crate::LayerError::Merged);
            }
            let Some(config) = configs.get(path) else {
                return Ok(None);
            };
            let layer_seed = mix_seed(seed, path);
            // PiSSA / OLoRA take the adapter out of the weight: the residual replaces the base.
            let (adapter, residual) = if config.init.decomposition().is_some() {
                let (adapter, residual) = layer.fresh_decomposed(config, layer_seed)?;
                (adapter, Some(residual))
            } else {
                (layer.fresh_adapter(config, layer_seed)?, None)
            };
            Ok(Some((path.to_string(), adapter, residual)))
        },
        |layer, (path, adapter, residual)| {
            if let Some(residual) = residual {
                layer.install_residual(residual);
            }
            // PEFT's state-dict names: the adapter name sits between the factor and `weight`,
            // except for the default adapter in files.
            let names = layer.factor_names(&adapter);
            for (factor, var) in adapter.vars() {
                vars.insert(named_key(&path, names, factor, name), var.clone());
            }
            match name {
                None => install_default(layer, Some(adapter)),
                Some(n) => {
                    layer.set_routing(None);
                    layer.adapter_set_mut().insert(n, adapter);
                }
            }
        },
    )?;
    Ok(())
}

/// The first few module paths of `layers`, for messages.
fn some_paths(layers: &[(String, &dyn crate::LoraLayer, Option<LayerConfig>)]) -> String {
    let mut shown: Vec<String> = layers
        .iter()
        .take(4)
        .map(|(p, _, _)| format!("`{p}`"))
        .collect();
    if layers.len() > 4 {
        shown.push(format!("and {} more", layers.len() - 4));
    }
    shown.join(", ")
}

/// [`Error::UnknownAdapter`] unless the model has an adapter called `name`.
pub(crate) fn check_known<M: LoraModel + ?Sized>(model: &M, name: &str) -> Result<()> {
    let known = adapter_names(model);
    if known.iter().any(|k| k == name) {
        Ok(())
    } else {
        Err(Error::UnknownAdapter {
            name: name.to_string(),
            known,
        })
    }
}

/// [`Error::Merged`] naming the first merged layer, if any.
pub(crate) fn refuse_if_merged<M: LoraModel + ?Sized>(model: &M) -> Result<()> {
    match layers(model).iter().find(|(_, l, _)| l.is_merged()) {
        Some((p, _, _)) => Err(Error::Merged { path: p.clone() }),
        None => Ok(()),
    }
}

/// Makes `name` active in every layer (`None`: the base alone).
pub(crate) fn set_active_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    name: Option<&str>,
) -> Result<()> {
    if let Some(n) = name {
        check_known(model, n)?;
    }
    change_adapter_sets(model, |set| set.set_active(name))
}

/// Applies `change` to every layer's adapters, refused while merged (a merged delta must never
/// be left in the weights of another adapter); clears mixed-adapter routings, which hold a
/// snapshot of the factors.
fn change_adapter_sets<M: LoraModel + ?Sized>(
    model: &mut M,
    change: impl Fn(&mut crate::adapter::AdapterSet),
) -> Result<()> {
    refuse_if_merged(model)?;
    prepare_then_commit(
        model,
        |_, _, _| Ok(Some(())),
        |layer, ()| {
            layer.set_routing(None);
            change(layer.adapter_set_mut());
        },
    )?;
    Ok(())
}

/// Removes the adapter `name` from every layer.
pub(crate) fn delete_adapter<M: LoraModel + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    check_known(model, name)?;
    change_adapter_sets(model, |set| {
        set.remove(name);
    })
}

/// The name active in the first layer (every layer has the same active name).
pub(crate) fn active_adapter<M: LoraModel + ?Sized>(model: &M) -> Option<String> {
    layers(model)
        .first()
        .and_then(|(_, l, _)| l.active_adapter_name().map(str::to_string))
}

/// `A`, `B` (and DoRA's magnitude) of every active adapter.
pub(crate) fn trainable_vars<M: LoraModel + ?Sized>(model: &M) -> Vec<Var> {
    layers(model)
        .iter()
        .filter_map(|(_, l, _)| l.adapter())
        .flat_map(|ad| {
            ad.vars()
                .into_iter()
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `(name, variable)` of `A`, `B` (and DoRA's magnitude) of every active adapter, named as
/// PEFT's file keys (`<path>.lora_A.weight`, `<path>.lora_magnitude_vector`): what an optimizer
/// state is saved under.
pub(crate) fn named_trainable_vars<M: LoraModel + ?Sized>(model: &M) -> Vec<(String, Var)> {
    layers(model)
        .iter()
        .filter_map(|(p, l, _)| l.adapter().map(|ad| (p, l, ad)))
        .flat_map(|(p, l, ad)| {
            let names = l.factor_names(ad);
            ad.vars()
                .into_iter()
                .map(|(factor, v)| (peft_key(p, names, factor), v.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Makes every layer draw its dropout masks from `rng`.
pub(crate) fn set_dropout_rng<M: LoraModel + ?Sized>(model: &mut M, rng: Option<&DropoutRng>) {
    // The callback never fails, so neither does the visit of a correct model.
    let _ = model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
        l.set_dropout_rng(rng.cloned());
        Ok(())
    });
}

/// Puts every layer in training or inference mode.
pub(crate) fn set_training<M: LoraModel + ?Sized>(model: &mut M, training: bool) {
    // The callback never fails, so neither does the visit of a correct model.
    let _ = model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
        l.set_training(training);
        Ok(())
    });
}

/// Trainable and total parameter counts, printed as PEFT's `print_trainable_parameters` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainableParameters {
    /// Parameters of the adapters (`A` and `B`).
    pub trainable: usize,
    /// Trainable plus frozen parameters.
    pub total: usize,
}

impl TrainableParameters {
    /// The counts of the LoRA layers of `model`: active adapters and frozen bases.
    pub fn of<M: LoraModel + ?Sized>(model: &M) -> Self {
        let mut counts = Self {
            trainable: 0,
            total: 0,
        };
        for (_, l, _) in layers(model) {
            let adapter = l.adapter().map_or(0, Adapter::num_parameters);
            counts.trainable += adapter;
            counts.total += l.base_parameters() + adapter;
        }
        counts
    }

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
