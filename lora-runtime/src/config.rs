//! LoRA hyper-parameters: [`LayerConfig`] for one layer (what `#[lora(...)]` declares) and
//! [`LoraConfig`], PEFT's `adapter_config.json`.
//!
//! ```
//! use lora_runtime::{LayerConfig, LoraConfig, LoraInit};
//!
//! let layer = LayerConfig::new(8, 16.0);
//! assert_eq!(layer.scaling(), 2.0);
//! assert_eq!(layer.with_rslora(true).scaling(), 16.0 / 8f64.sqrt());
//!
//! let json = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
//!                "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4},
//!                "some_future_field": 1}"#;
//! let config = LoraConfig::from_json(json)?;
//! assert_eq!(config.rank_for("model.layers.0.self_attn.q_proj"), 8);
//! assert_eq!(config.rank_for("model.layers.0.self_attn.v_proj"), 4);
//! assert!(config.targets_module("model.layers.0.self_attn.q_proj"));
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, LayerError, LayerResult, Result};

/// How a fresh adapter is initialised. With `Kaiming` and `Gaussian`, `A` is random and `B`
/// starts at zero, so a fresh adapter is an exact no-op; `Pissa` and `Olora` instead take
/// `s B A` out of the layer's weight (see [`decompose`](crate::decompose)), which leaves the
/// output unchanged too but changes the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights = true`): `A ~ kaiming_uniform(a = sqrt(5))`, which is
    /// `U(-1/sqrt(in), 1/sqrt(in))`.
    #[default]
    Kaiming,
    /// PEFT's `init_lora_weights = "gaussian"`: `A ~ N(0, std = 1/r)`.
    Gaussian,
    /// PEFT's `"pissa"` (`niter: None`, exact SVD) and `"pissa_niter_K"` (randomised SVD with `K`
    /// subspace iterations): the top singular directions of the weight.
    Pissa {
        /// Subspace iterations of the randomised SVD (`None`: exact).
        niter: Option<usize>,
    },
    /// PEFT's `"olora"`: the leading factors of the weight's QR decomposition.
    Olora,
}

impl LoraInit {
    /// The scheme PEFT's `init_lora_weights` name gives: `"gaussian"`, `"pissa"`,
    /// `"pissa_niter_K"`, `"olora"` (`true` is [`Kaiming`](Self::Kaiming)).
    ///
    /// ```
    /// use lora_runtime::LoraInit;
    /// assert_eq!(LoraInit::from_peft_name("pissa_niter_4"), Some(LoraInit::Pissa { niter: Some(4) }));
    /// assert_eq!(LoraInit::from_peft_name("loftq"), None);
    /// ```
    pub fn from_peft_name(name: &str) -> Option<Self> {
        match name {
            "gaussian" => Some(Self::Gaussian),
            "pissa" => Some(Self::Pissa { niter: None }),
            "olora" => Some(Self::Olora),
            _ => {
                let k = name.strip_prefix("pissa_niter_")?.parse().ok()?;
                Some(Self::Pissa { niter: Some(k) })
            }
        }
    }

    /// The decomposition this scheme takes out of the weight, if it is one.
    pub fn decomposition(self) -> Option<crate::decompose::Decomposition> {
        use crate::decompose::Decomposition;
        match self {
            Self::Pissa { niter } => Some(Decomposition::Pissa { niter }),
            Self::Olora => Some(Decomposition::Olora),
            Self::Kaiming | Self::Gaussian => None,
        }
    }
}

/// The LoRA hyper-parameters of one layer: what `#[lora(rank = .., alpha = .., ..)]` declares for
/// the targets of a struct.
///
/// Defaults are PEFT's: `rank = 8`, `alpha = 8`, `dropout = 0`, `use_rslora = false`,
/// `init = Kaiming`, `use_dora = false`.
///
/// ```
/// use lora_runtime::{LayerConfig, LoraInit};
/// let cfg = LayerConfig::new(4, 8.0).with_dropout(0.05).with_init(LoraInit::Gaussian);
/// assert_eq!(cfg.scaling(), 2.0);
/// cfg.validate()?;
/// # Ok::<(), lora_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerConfig {
    /// The rank `r` of the factors `A [r, in]` and `B [out, r]`.
    pub rank: usize,
    /// `lora_alpha`: the delta is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout probability applied to the input of the LoRA branch in training mode.
    pub dropout: f32,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// How `A` is initialised.
    pub init: LoraInit,
    /// DoRA (weight-decomposed LoRA, PEFT's `use_dora`): a trainable magnitude per output
    /// feature rescales `W + s B A` row by row (see [`Adapter`](crate::Adapter)).
    pub use_dora: bool,
    /// AdaLoRA (PEFT's `peft_type: "ADALORA"`): fresh adapters are SVD-like triplets
    /// `B diag(E) A` of rank `rank` (PEFT's `init_r`) with these training hyper-parameters,
    /// scaled by `alpha / (ranknum + 1e-5)` (see [`Adapter`](crate::Adapter)). `None`: LoRA.
    pub adalora: Option<AdaLoraSchedule>,
}

impl Default for LayerConfig {
    fn default() -> Self {
        Self::new(8, 8.0)
    }
}

impl LayerConfig {
    /// A config with the given rank and alpha, no dropout, standard scaling, Kaiming init, no
    /// DoRA.
    pub const fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            init: LoraInit::Kaiming,
            use_dora: false,
            adalora: None,
        }
    }

    /// Makes fresh adapters AdaLoRA adapters (`Some`) with this schedule, or LoRA ones (`None`):
    /// `E = 0` and `A`, `B ~ N(0, 0.02)`, as PEFT's `reset_lora_parameters` for AdaLoRA, so a
    /// fresh adapter changes nothing.
    ///
    /// ```
    /// use lora_runtime::{AdaLoraSchedule, LayerConfig};
    /// let cfg = LayerConfig::new(12, 32.0).with_adalora(Some(AdaLoraSchedule::default()));
    /// assert_eq!(cfg.scaling(), 32.0 / (12.0 + 1e-5));
    /// ```
    pub const fn with_adalora(mut self, adalora: Option<AdaLoraSchedule>) -> Self {
        self.adalora = adalora;
        self
    }

    /// Switches DoRA on or off: fresh adapters then carry a magnitude vector initialised to the
    /// row norms of the base weight, as PEFT's `use_dora = true` does.
    ///
    /// ```
    /// use lora_runtime::LayerConfig;
    /// assert!(LayerConfig::new(4, 8.0).with_dora(true).use_dora);
    /// ```
    pub const fn with_dora(mut self, use_dora: bool) -> Self {
        self.use_dora = use_dora;
        self
    }

    /// Sets the dropout probability of the LoRA branch.
    pub const fn with_dropout(mut self, dropout: f32) -> Self {
        self.dropout = dropout;
        self
    }

    /// Switches rsLoRA scaling on or off.
    pub const fn with_rslora(mut self, use_rslora: bool) -> Self {
        self.use_rslora = use_rslora;
        self
    }

    /// Sets the initialisation scheme of `A`.
    pub const fn with_init(mut self, init: LoraInit) -> Self {
        self.init = init;
        self
    }

    /// The factor applied to `B A`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA; for AdaLoRA
    /// `alpha / (r + 1e-5)` (the rank of a fresh adapter is its `ranknum`).
    pub fn scaling(&self) -> f64 {
        if self.adalora.is_some() {
            return adalora_scaling(self.rank, self.alpha, self.rank);
        }
        scaling(self.rank, self.alpha, self.use_rslora)
    }

    /// Checks rank > 0, finite alpha > 0, dropout in `[0, 1)`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        validate_values(self.rank, self.alpha, self.dropout as f64, None)
    }

    /// [`validate`](Self::validate) for a layer, which reports without a path.
    pub(crate) fn check(&self) -> LayerResult<()> {
        out_of_range(self.rank, self.alpha, f64::from(self.dropout)).map_or(
            Ok(()),
            |(field, reason)| {
                Err(LayerError::InvalidConfig {
                    field: field.into(),
                    reason,
                })
            },
        )
    }
}

/// AdaLoRA's factor on `B (A * E)`, as PEFT's `SVDLinear`: `scaling / (ranknum + 1e-5)` with
/// `scaling = lora_alpha if lora_alpha > 0 else r`.
pub(crate) fn adalora_scaling(rank: usize, alpha: f64, ranknum: usize) -> f64 {
    let numerator = if alpha > 0.0 { alpha } else { rank as f64 };
    numerator / (ranknum as f64 + 1e-5)
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub(crate) fn scaling(rank: usize, alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

fn invalid(file: Option<&Path>, field: &str, reason: String) -> Error {
    Error::InvalidConfig {
        file: file.map(Path::to_path_buf),
        field: field.to_string(),
        reason,
    }
}

fn validate_values(rank: usize, alpha: f64, dropout: f64, file: Option<&Path>) -> Result<()> {
    out_of_range(rank, alpha, dropout)
        .map_or(Ok(()), |(field, reason)| Err(invalid(file, field, reason)))
}

/// The first of rank, alpha and dropout that is out of range: its PEFT field name and why.
fn out_of_range(rank: usize, alpha: f64, dropout: f64) -> Option<(&'static str, String)> {
    if rank == 0 {
        return Some(("r", "the rank must be at least 1".into()));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Some((
            "lora_alpha",
            format!("alpha must be a finite number > 0, got {alpha}"),
        ));
    }
    if !(0.0..1.0).contains(&dropout) {
        return Some((
            "lora_dropout",
            format!("dropout must be in [0, 1), got {dropout}"),
        ));
    }
    None
}

/// AdaLoRA's training hyper-parameters: the fields of PEFT's `AdaLoraConfig` other than
/// `init_r` (the rank of the adapters) and `rank_pattern` (what the allocation kept). Defaults
/// are PEFT's, except `total_step`, which PEFT requires and has no default for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraSchedule {
    /// `target_r`: the average rank the budget ends at.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// `tinit`: warm-up steps before the budget starts to fall.
    #[serde(default)]
    pub tinit: usize,
    /// `tfinal`: final steps at the final budget.
    #[serde(default)]
    pub tfinal: usize,
    /// `deltaT`: steps between two allocations.
    #[serde(rename = "deltaT", default = "default_delta_t")]
    pub delta_t: usize,
    /// `beta1`: the EMA factor of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// `beta2`: the EMA factor of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// `orth_reg_weight`: the weight of the orthogonal regulariser in the loss.
    #[serde(default = "default_orth_reg_weight")]
    pub orth_reg_weight: f64,
    /// `total_step`: the number of training steps (PEFT refuses a config without it).
    #[serde(default)]
    pub total_step: Option<usize>,
}

fn default_target_r() -> usize {
    8
}
fn default_delta_t() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth_reg_weight() -> f64 {
    0.5
}

impl Default for AdaLoraSchedule {
    fn default() -> Self {
        Self {
            target_r: default_target_r(),
            tinit: 0,
            tfinal: 0,
            delta_t: default_delta_t(),
            beta1: default_beta(),
            beta2: default_beta(),
            orth_reg_weight: default_orth_reg_weight(),
            total_step: None,
        }
    }
}

/// The AdaLoRA part of an `adapter_config.json` with `peft_type: "ADALORA"`: `init_r`, the
/// schedule and `rank_pattern`, which for AdaLoRA maps `<module path>.lora_E` to the kept
/// singular values (a list of `init_r` booleans). A module with a pattern holds as many
/// singular values as the list has `true`s and keeps `ranknum = init_r`, as PEFT's
/// `resize_modules_by_rank_pattern` leaves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    /// `init_r`: the rank every adapter starts with (and its `ranknum`).
    #[serde(default = "default_init_r")]
    pub init_r: usize,
    /// The training hyper-parameters.
    #[serde(flatten)]
    pub schedule: AdaLoraSchedule,
    /// `rank_pattern`: `<module path>.lora_E` -> kept singular values (`None`: all kept).
    #[serde(default)]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

fn default_init_r() -> usize {
    12
}

/// The fields an [`AdaLoraConfig`] takes out of an `adapter_config.json`.
const ADALORA_FIELDS: &[&str] = &[
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "rank_pattern",
];

impl AdaLoraConfig {
    /// The kept singular values of the module at `module_path`, if the `rank_pattern` names it
    /// (as `<path>.lora_E`, or with an adapter name after it, `<path>.lora_E.default`).
    pub fn mask_for(&self, module_path: &str) -> Option<&[bool]> {
        let patterns = self.rank_pattern.as_ref()?;
        let key = format!("{module_path}.lora_E");
        patterns
            .get(&key)
            .or_else(|| {
                patterns.iter().find_map(|(k, v)| {
                    let rest = k.strip_prefix(&key)?.strip_prefix('.')?;
                    (!rest.contains('.')).then_some(v)
                })
            })
            .map(Vec::as_slice)
    }

    /// The rank of the module at `module_path` in the file: the `true`s of its rank pattern,
    /// else `init_r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        self.mask_for(module_path)
            .map_or(self.init_r, |m| m.iter().filter(|&&k| k).count())
    }
}

/// PEFT's `target_modules`: a list of module names (matched as the whole path or its last
/// components) or one regular expression (matched against the whole path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names such as `["q_proj", "v_proj"]`: a path matches when it equals a name or ends with
    /// `.name`.
    List(Vec<String>),
    /// A regex such as `".*\.(q|v)_proj"`, matched against the whole module path.
    Regex(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(Vec::new())
    }
}

/// PEFT's `init_lora_weights`: `true`, `false` or a scheme name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` (Kaiming A, zero B) or `false` (both random; only for tests in PEFT).
    Bool(bool),
    /// A scheme name such as `"gaussian"`.
    Name(String),
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

impl From<LoraInit> for InitLoraWeights {
    fn from(init: LoraInit) -> Self {
        match init {
            LoraInit::Kaiming => InitLoraWeights::Bool(true),
            LoraInit::Gaussian => InitLoraWeights::Name("gaussian".into()),
            LoraInit::Pissa { niter: None } => InitLoraWeights::Name("pissa".into()),
            LoraInit::Pissa { niter: Some(k) } => InitLoraWeights::Name(format!("pissa_niter_{k}")),
            LoraInit::Olora => InitLoraWeights::Name("olora".into()),
        }
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}

/// PEFT's `adapter_config.json` for a LoRA adapter.
///
/// Unknown fields are tolerated on load and kept (in [`LoraConfig::extra`]) so a config
/// round-trips; fields that ask for features this runtime does not implement are refused by
/// [`LoraConfig::check_supported`]. Written with sorted keys and an indent of 2, as PEFT does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Default rank `r`.
    #[serde(rename = "r", default = "default_rank")]
    pub rank: usize,
    /// Default `lora_alpha`.
    #[serde(rename = "lora_alpha", default = "default_alpha")]
    pub alpha: f64,
    /// `lora_dropout`.
    #[serde(rename = "lora_dropout", default)]
    pub dropout: f64,
    /// `target_modules`: names or a regex.
    #[serde(rename = "target_modules", default)]
    pub targets: TargetModules,
    /// `use_rslora`: scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// `init_lora_weights`.
    #[serde(rename = "init_lora_weights", default)]
    pub init: InitLoraWeights,
    /// `bias`: only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// `use_dora`: DoRA adapters (a `lora_magnitude_vector` per targeted module).
    #[serde(default)]
    pub use_dora: bool,
    /// `fan_in_fan_out`: targets store their weight `[in, out]` (GPT-2 `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `inference_mode`: PEFT writes `true` on save.
    #[serde(default)]
    pub inference_mode: bool,
    /// `base_model_name_or_path`.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// `task_type`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// `modules_to_save`: not supported when non-empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `rank_pattern`: module-name pattern -> rank.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// `alpha_pattern`: module-name pattern -> alpha.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `layers_to_transform`: not supported when set.
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    /// `layers_pattern`.
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    /// `exclude_modules`.
    #[serde(default)]
    pub exclude_modules: Option<Value>,
    /// `peft_version`.
    #[serde(default)]
    pub peft_version: Option<String>,
    /// The AdaLoRA fields of a `peft_type: "ADALORA"` config (`None` for LoRA). Read and
    /// written by [`from_json`](Self::from_json) / [`to_json`](Self::to_json) (its
    /// `rank_pattern` replaces LoRA's, which is then empty).
    #[serde(skip)]
    pub adalora: Option<AdaLoraConfig>,
    /// Every other field, kept as it was read.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self::new(8, 8.0, Vec::<String>::new())
    }
}

/// Fields PEFT added over time that ask for behaviour we do not implement when they are set to
/// anything but null / false / an empty list or map.
const UNSUPPORTED_EXTRA_FIELDS: &[(&str, &str)] = &[
    ("lora_bias", "a trainable bias on lora_B"),
    ("target_parameters", "LoRA on raw parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "layer replication"),
    ("use_qalora", "QA-LoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("arrow_config", "Arrow routing"),
    ("megatron_config", "Megatron parallel layers"),
];

impl LoraConfig {
    /// A config with the given default rank, alpha and target module names; everything else is
    /// PEFT's default.
    pub fn new(
        rank: usize,
        alpha: f64,
        targets: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            peft_type: default_peft_type(),
            rank,
            alpha,
            dropout: 0.0,
            targets: TargetModules::List(targets.into_iter().map(Into::into).collect()),
            use_rslora: false,
            init: InitLoraWeights::default(),
            bias: default_bias(),
            use_dora: false,
            fan_in_fan_out: false,
            inference_mode: true,
            base_model_name_or_path: None,
            task_type: None,
            modules_to_save: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            layers_pattern: None,
            exclude_modules: None,
            peft_version: None,
            adalora: None,
            extra: BTreeMap::new(),
        }
    }

    /// An AdaLoRA config (`peft_type: "ADALORA"`) for adapters of rank `init_r` with alpha
    /// `alpha` on `targets`; `r` keeps PEFT's default 8, which AdaLoRA ignores.
    ///
    /// ```
    /// use lora_runtime::{AdaLoraSchedule, LoraConfig};
    /// let cfg = LoraConfig::adalora(12, 32.0, ["q_proj"], AdaLoraSchedule::default());
    /// let json = cfg.to_json()?;
    /// assert!(json.contains("\"peft_type\": \"ADALORA\"") && json.contains("\"init_r\": 12"));
    /// assert_eq!(LoraConfig::from_json(&json)?, cfg);
    /// assert_eq!(cfg.layer_config("q_proj")?.rank, 12);
    /// # Ok::<(), lora_runtime::Error>(())
    /// ```
    pub fn adalora(
        init_r: usize,
        alpha: f64,
        targets: impl IntoIterator<Item = impl Into<String>>,
        schedule: AdaLoraSchedule,
    ) -> Self {
        let mut config = Self::new(default_rank(), alpha, targets);
        config.peft_type = ADALORA.into();
        config.adalora = Some(AdaLoraConfig {
            init_r,
            schedule,
            rank_pattern: None,
        });
        config
    }

    /// Parses an `adapter_config.json` text.
    ///
    /// # Errors
    /// [`Error::Json`] when the text is not a JSON object of the expected shape.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, Path::new("adapter_config.json"))
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self> {
        let json = |source| Error::Json {
            path: path.to_path_buf(),
            source,
        };
        let mut value: Value = serde_json::from_str(text).map_err(json)?;
        let adalora = match &mut value {
            Value::Object(fields)
                if fields.get("peft_type").and_then(Value::as_str) == Some(ADALORA) =>
            {
                // AdaLoRA's fields (its `rank_pattern` holds lists of booleans, not ranks).
                let own: serde_json::Map<String, Value> = ADALORA_FIELDS
                    .iter()
                    .filter_map(|k| fields.remove(*k).map(|v| ((*k).to_string(), v)))
                    .collect();
                Some(serde_json::from_value::<AdaLoraConfig>(Value::Object(own)).map_err(json)?)
            }
            _ => None,
        };
        let mut config: Self = serde_json::from_value(value).map_err(json)?;
        config.adalora = adalora;
        Ok(config)
    }

    /// Reads and parses an `adapter_config.json` file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Json`] when it does not parse.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// The JSON text PEFT writes: sorted keys, indent 2.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if a value cannot be represented in JSON (a non-finite alpha).
    pub fn to_json(&self) -> Result<String> {
        // serde_json's `Value` keeps object keys in a BTreeMap: serializing through it sorts them.
        let mut value = serde_json::to_value(self)
            .map_err(|e| invalid(None, "adapter_config", e.to_string()))?;
        if let (Some(adalora), Value::Object(fields)) = (&self.adalora, &mut value) {
            let own = serde_json::to_value(adalora)
                .map_err(|e| invalid(None, "adapter_config", e.to_string()))?;
            if let Value::Object(own) = own {
                fields.extend(own);
            }
        }
        serde_json::to_string_pretty(&value)
            .map_err(|e| invalid(None, "adapter_config", e.to_string()))
    }

    /// Refuses PEFT features this runtime does not implement, naming the field.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the first unsupported field; [`Error::InvalidConfig`] for
    /// a rank, alpha or dropout out of range.
    pub fn check_supported(&self, path: &Path) -> Result<()> {
        self.check(Some(path))
    }

    /// [`check_supported`](Self::check_supported) for a config built in code (no file).
    ///
    /// # Errors
    /// As [`check_supported`](Self::check_supported).
    pub fn validate(&self) -> Result<()> {
        self.check(None)
    }

    fn check(&self, path: Option<&Path>) -> Result<()> {
        let unsupported = |field: &str, reason: String| Error::Unsupported {
            path: path.map(Path::to_path_buf),
            field: field.to_string(),
            reason,
        };
        match (self.peft_type.as_str(), &self.adalora) {
            ("LORA", None) => {}
            (ADALORA, Some(adalora)) => self.check_adalora(adalora, path)?,
            (ADALORA, None) => return Err(invalid(
                path,
                "peft_type",
                "`ADALORA` without AdaLoRA fields: build the config with `LoraConfig::adalora` \
                     or read it with `LoraConfig::from_json`"
                    .into(),
            )),
            (other, _) => {
                return Err(unsupported(
                    "peft_type",
                    format!("`{other}` adapters are not supported, only `LORA` and `ADALORA`"),
                ));
            }
        }
        if self.bias != "none" {
            return Err(unsupported(
                "bias",
                format!(
                    "bias = `{}` (trained biases) is not supported, only `none`",
                    self.bias
                ),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported(
                "modules_to_save",
                "fully trained extra modules are not supported".into(),
            ));
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !is_unset(v))
        {
            return Err(unsupported(
                "layers_to_transform",
                "selecting layers by index is not supported".into(),
            ));
        }
        for (field, what) in UNSUPPORTED_EXTRA_FIELDS {
            if self.extra.get(*field).is_some_and(|v| !is_unset(v)) {
                return Err(unsupported(field, format!("{what} is not supported")));
            }
        }
        validate_values(self.rank, self.alpha, self.dropout, path)?;
        for (pattern, &rank) in &self.rank_pattern {
            if rank == 0 {
                return Err(invalid(
                    path,
                    "rank_pattern",
                    format!("rank of `{pattern}` must be at least 1"),
                ));
            }
        }
        for (pattern, &alpha) in &self.alpha_pattern {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(invalid(
                    path,
                    "alpha_pattern",
                    format!("alpha of `{pattern}` must be a finite number > 0, got {alpha}"),
                ));
            }
        }
        if let TargetModules::Regex(re) = &self.targets {
            full_match_regex(re).map_err(|e| invalid(path, "target_modules", e))?;
        }
        Ok(())
    }

    /// What AdaLoRA adds to the checks: a rank, a positive alpha (PEFT's fallback to `r` for
    /// `lora_alpha <= 0` is not supported), no DoRA, rsLoRA or LoRA patterns, rank patterns of
    /// `init_r` booleans.
    fn check_adalora(&self, adalora: &AdaLoraConfig, path: Option<&Path>) -> Result<()> {
        let unsupported = |field: &str, reason: &str| Error::Unsupported {
            path: path.map(Path::to_path_buf),
            field: field.to_string(),
            reason: reason.to_string(),
        };
        if adalora.init_r == 0 {
            return Err(invalid(path, "init_r", "must be at least 1".into()));
        }
        if self.use_dora {
            return Err(unsupported(
                "use_dora",
                "DoRA with AdaLoRA is not supported (nor in PEFT)",
            ));
        }
        if self.use_rslora {
            return Err(unsupported(
                "use_rslora",
                "AdaLoRA scales by `lora_alpha / (ranknum + 1e-5)`: rsLoRA does not apply",
            ));
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return Err(unsupported(
                "alpha_pattern",
                "AdaLoRA takes one `lora_alpha` and a `rank_pattern` of kept singular values",
            ));
        }
        for (name, mask) in adalora.rank_pattern.iter().flatten() {
            if mask.len() != adalora.init_r {
                return Err(invalid(
                    path,
                    "rank_pattern",
                    format!(
                        "`{name}` has {} entries but `init_r` is {}",
                        mask.len(),
                        adalora.init_r
                    ),
                ));
            }
            if !mask.contains(&true) {
                return Err(Error::Unsupported {
                    path: path.map(Path::to_path_buf),
                    field: "rank_pattern".into(),
                    reason: format!(
                        "`{name}` keeps no singular value (rank 0): such modules are not supported"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The initialisation `init_lora_weights` asks for.
    pub(crate) fn init_scheme(&self) -> std::result::Result<LoraInit, String> {
        match &self.init {
            InitLoraWeights::Bool(true) => Ok(LoraInit::Kaiming),
            InitLoraWeights::Name(n) => LoraInit::from_peft_name(n).ok_or_else(|| {
                format!(
                    "`{n}` is not supported: use `true` (kaiming), `\"gaussian\"`, `\"pissa\"`, \
                     `\"pissa_niter_K\"` or `\"olora\"`"
                )
            }),
            InitLoraWeights::Bool(false) => Err(
                "`false` (random B, for PEFT's tests) is not supported: use `true` or `\"gaussian\"`"
                    .into(),
            ),
        }
    }

    /// The hyper-parameters of the adapter this config gives the module at `module_path`: rank
    /// and alpha with their patterns, rsLoRA, DoRA, dropout and init; for AdaLoRA rank `init_r`
    /// and the schedule. Whether the module is targeted
    /// at all is [`targets_module`](Self::targets_module).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for an initialisation this runtime does not implement.
    pub fn layer_config(&self, module_path: &str) -> Result<LayerConfig> {
        let init = self.init_scheme().map_err(|reason| Error::Unsupported {
            path: None,
            field: "init_lora_weights".into(),
            reason,
        })?;
        // AdaLoRA creates every adapter at `init_r`, as PEFT's `AdaLoraModel` does (its rank
        // pattern only shapes what a file holds).
        let rank = match &self.adalora {
            Some(adalora) => adalora.init_r,
            None => self.rank_for(module_path),
        };
        Ok(LayerConfig {
            rank,
            alpha: self.alpha_for(module_path),
            dropout: self.dropout as f32,
            use_rslora: self.use_rslora,
            init,
            use_dora: self.use_dora,
            adalora: self.adalora.as_ref().map(|a| a.schedule),
        })
    }

    /// The rank of the module at `module_path`: the first matching `rank_pattern` entry, else `r`;
    /// for AdaLoRA the kept singular values of its rank pattern, else `init_r`.
    pub fn rank_for(&self, module_path: &str) -> usize {
        if let Some(adalora) = &self.adalora {
            return adalora.rank_for(module_path);
        }
        pattern_value(&self.rank_pattern, module_path).unwrap_or(self.rank)
    }

    /// AdaLoRA's `ranknum` of the module at `module_path` (`init_r`, with or without a rank
    /// pattern, as PEFT loads it); `None` for LoRA.
    pub fn ranknum_for(&self, module_path: &str) -> Option<usize> {
        let _ = module_path;
        self.adalora.as_ref().map(|a| a.init_r)
    }

    /// The alpha of the module at `module_path`: the first matching `alpha_pattern` entry, else
    /// `lora_alpha`.
    pub fn alpha_for(&self, module_path: &str) -> f64 {
        pattern_value(&self.alpha_pattern, module_path).unwrap_or(self.alpha)
    }

    /// The scaling of the module at `module_path`, with patterns and rsLoRA (AdaLoRA's
    /// `alpha / (ranknum + 1e-5)`).
    pub fn scaling_for(&self, module_path: &str) -> f64 {
        if let Some(ranknum) = self.ranknum_for(module_path) {
            return adalora_scaling(self.rank_for(module_path), self.alpha, ranknum);
        }
        scaling(
            self.rank_for(module_path),
            self.alpha_for(module_path),
            self.use_rslora,
        )
    }

    /// Whether `target_modules` selects the module at `module_path`, as PEFT decides it: a regex
    /// must match the whole path; a name must equal the path or its last components;
    /// `"all-linear"` selects every LoRA layer but the output layer `lm_head`. A module that
    /// `exclude_modules` names (list or regex, matched the same way) is not selected.
    pub fn targets_module(&self, module_path: &str) -> bool {
        let excluded = match &self.exclude_modules {
            Some(Value::String(re)) => {
                full_match_regex(re).is_ok_and(|re| re.is_match(module_path))
            }
            Some(Value::Array(names)) => names
                .iter()
                .filter_map(Value::as_str)
                .any(|name| path_ends_with(module_path, name)),
            _ => false,
        };
        if excluded {
            return false;
        }
        match &self.targets {
            TargetModules::Regex(re) if re == ALL_LINEAR => {
                module_path != "lm_head" && !module_path.ends_with(".lm_head")
            }
            TargetModules::Regex(re) => {
                full_match_regex(re).is_ok_and(|re| re.is_match(module_path))
            }
            TargetModules::List(names) => {
                names.iter().any(|name| path_ends_with(module_path, name))
            }
        }
    }
}

/// PEFT's `peft_type` of AdaLoRA adapters.
pub const ADALORA: &str = "ADALORA";

/// PEFT's `target_modules = "all-linear"`.
pub const ALL_LINEAR: &str = "all-linear";

/// Whether `path` is `name` or ends with `.name`.
fn path_ends_with(path: &str, name: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|rest| rest.ends_with('.'))
}

fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn full_match_regex(re: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("invalid regex: {e}"))
}

/// PEFT's `get_pattern_key`: an exact key wins, else the first key `k` (in sorted order) with
/// `re.match(rf"(.*\.)?({k})$", path)`.
fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, module_path: &str) -> Option<T> {
    if let Some(v) = patterns.get(module_path) {
        return Some(*v);
    }
    patterns.iter().find_map(|(key, v)| {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).ok()?;
        re.is_match(module_path).then_some(*v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_kept_and_keys_sorted() {
        let json = r#"{"zeta": 1, "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "model\\..*\\.(q|v)_proj"}"#;
        let cfg = LoraConfig::from_json(json).unwrap();
        assert_eq!(cfg.extra.get("zeta"), Some(&Value::from(1)));
        assert!(cfg.targets_module("model.layers.3.q_proj"));
        assert!(!cfg.targets_module("model.layers.3.k_proj"));
        assert!(!cfg.targets_module("x.model.layers.3.q_proj"));
        let out = cfg.to_json().unwrap();
        let keys: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("  \"").and_then(|l| l.split('"').next()))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(out.contains("\n  \"zeta\": 1"));
        assert_eq!(LoraConfig::from_json(&out).unwrap(), cfg);
    }

    #[test]
    fn patterns_follow_peft() {
        let mut cfg = LoraConfig::new(8, 16.0, ["q_proj", "v_proj"]);
        cfg.rank_pattern.insert("v_proj".into(), 4);
        cfg.rank_pattern
            .insert("layers.1.self_attn.q_proj".into(), 2);
        cfg.alpha_pattern.insert(r"layers\.0\..*".into(), 32.0);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.v_proj"), 4);
        assert_eq!(cfg.rank_for("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(cfg.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(cfg.alpha_for("model.layers.0.self_attn.q_proj"), 32.0);
        assert_eq!(cfg.alpha_for("model.layers.1.self_attn.q_proj"), 16.0);
        // "q_proj" must not match "qq_proj": patterns match whole path components.
        assert_eq!(cfg.rank_for("model.qq_v_proj"), 8);
        assert!(!cfg.targets_module("model.layers.0.self_attn.kq_proj"));
    }

    /// PEFT's AdaLoRA config: its fields leave `extra`, `rank_pattern` holds masks (with or
    /// without the adapter name), fresh adapters take `init_r`, and it round-trips.
    #[test]
    fn adalora_configs_follow_peft() {
        let json = r#"{"peft_type": "ADALORA", "r": 8, "init_r": 4, "target_r": 2, "lora_alpha": 16,
            "deltaT": 3, "total_step": 20, "target_modules": ["q_proj", "v_proj"], "loftq_config": {},
            "rank_pattern": {"layers.0.q_proj.lora_E": [true, false, true, false],
                             "layers.1.v_proj.lora_E.default": [false, false, false, true]}}"#;
        let cfg = LoraConfig::from_json(json).unwrap();
        cfg.validate().unwrap();
        let ada = cfg.adalora.as_ref().unwrap();
        assert_eq!(
            (ada.init_r, ada.schedule.target_r, ada.schedule.delta_t),
            (4, 2, 3)
        );
        assert_eq!(ada.schedule.beta1, 0.85);
        assert!(cfg.rank_pattern.is_empty() && !cfg.extra.contains_key("init_r"));
        assert_eq!(cfg.rank_for("layers.0.q_proj"), 2);
        assert_eq!(cfg.rank_for("layers.1.v_proj"), 1);
        assert_eq!(cfg.rank_for("layers.1.q_proj"), 4);
        assert_eq!(cfg.scaling_for("layers.0.q_proj"), 16.0 / (4.0 + 1e-5));
        let layer = cfg.layer_config("layers.0.q_proj").unwrap();
        assert_eq!(
            (layer.rank, layer.adalora.map(|s| s.total_step)),
            (4, Some(Some(20)))
        );
        let again = LoraConfig::from_json(&cfg.to_json().unwrap()).unwrap();
        assert_eq!(again, cfg);
        let bad = json.replace("[true, false, true, false]", "[false, false, false, false]");
        let err = LoraConfig::from_json(&bad).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("keeps no singular value"), "{err}");
        let lora = LoraConfig::from_json(r#"{"peft_type": "LORA", "init_r": 4}"#).unwrap();
        assert!(lora.adalora.is_none() && lora.extra.contains_key("init_r"));
    }

    #[test]
    fn unsupported_features_are_named() {
        let p = Path::new("a/adapter_config.json");
        for (json, field) in [
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"modules_to_save": ["lm_head"]}"#, "modules_to_save"),
            (r#"{"layers_to_transform": [0, 1]}"#, "layers_to_transform"),
            (r#"{"lora_bias": true}"#, "lora_bias"),
            (r#"{"peft_type": "IA3"}"#, "peft_type"),
        ] {
            let err = LoraConfig::from_json(json)
                .unwrap()
                .check_supported(p)
                .unwrap_err();
            match err {
                Error::Unsupported { field: f, .. } => assert_eq!(f, field),
                other => panic!("{json}: {other}"),
            }
        }
        let ok = LoraConfig::from_json(r#"{"modules_to_save": null, "lora_bias": false}"#).unwrap();
        ok.check_supported(p).unwrap();
        let dora = LoraConfig::from_json(r#"{"use_dora": true}"#).unwrap();
        dora.check_supported(p).unwrap();
        assert!(dora.layer_config("q_proj").unwrap().use_dora);
        let err = LoraConfig::from_json(r#"{"r": 0}"#)
            .unwrap()
            .check_supported(p)
            .unwrap_err();
        assert!(err.to_string().contains("`r`"), "{err}");
        let err = LoraConfig::from_json(r#"{"lora_alpha": -1}"#)
            .unwrap()
            .check_supported(p)
            .unwrap_err();
        assert!(err.to_string().contains("`lora_alpha`"), "{err}");
    }
}
