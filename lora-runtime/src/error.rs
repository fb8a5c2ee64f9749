//! The one error type of the runtime.
//!
//! Every variant names what went wrong: the file, the tensor key, the config field or the
//! module path, so a user can find the fault without a debugger.

use std::path::PathBuf;

/// A `Result` whose error is the runtime's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the runtime.
///
/// Operations that fail leave the model exactly as it was: validation happens before any layer is
/// touched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A safetensors file could not be parsed (truncated, corrupt header, bad offsets, ...).
    #[error("{}: not a valid safetensors file: {source}", path.display())]
    SafeTensors {
        /// The file at fault.
        path: PathBuf,
        /// What the safetensors parser found.
        source: safetensors::SafeTensorError,
    },

    /// A JSON file (adapter config, shard index) could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// What the JSON parser found.
        source: serde_json::Error,
    },

    /// A configuration value is invalid (rank 0, negative alpha, dropout outside `[0, 1)`, ...).
    #[error("invalid config field `{field}`{}: {reason}", in_file(file))]
    InvalidConfig {
        /// The config file, when the value came from one.
        file: Option<PathBuf>,
        /// The field at fault, e.g. `r` or `lora_alpha`.
        field: String,
        /// Why the value is refused.
        reason: String,
    },

    /// The adapter uses a PEFT feature this runtime does not implement (DoRA, `modules_to_save`, ...).
    #[error("{}unsupported PEFT feature `{field}`: {reason}", file_prefix(path))]
    Unsupported {
        /// The file that asks for the feature (`None` for a config built in code).
        path: Option<PathBuf>,
        /// The config field or tensor key that asks for it.
        field: String,
        /// What is not supported and what to do instead.
        reason: String,
    },

    /// A tensor in an adapter file is wrong (shape, dtype, non-finite values, missing partner).
    #[error("{}: tensor `{key}`: {reason}", file.display())]
    BadTensor {
        /// The adapter file.
        file: PathBuf,
        /// The tensor key at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A file, or a size a file declares (its safetensors header), is larger than the file
    /// itself or than a sane limit; nothing was allocated for it.
    #[error("{}: {what} is {size} bytes, more than {limit_what} ({limit} bytes)", path.display())]
    TooLarge {
        /// The file at fault.
        path: PathBuf,
        /// What is too large, e.g. `the declared safetensors header`.
        what: String,
        /// Its size in bytes.
        size: u64,
        /// What it was checked against, e.g. `the file` or `the limit`.
        limit_what: String,
        /// The limit in bytes.
        limit: u64,
    },

    /// The safetensors metadata of an adapter file holds an entry this runtime writes
    /// (`lora.base_fingerprint.<module>`) in a form it cannot read, or for a module without
    /// factors.
    #[error("{}: metadata `{key}`: {reason}", file.display())]
    BadMetadata {
        /// The adapter file.
        file: PathBuf,
        /// The metadata key at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The adapter was saved from a different base weight than the model's (its recorded
    /// fingerprint, shape and hash, does not match).
    #[error(
        "{}: the adapter was trained on a different base weight for `{module}` (saved: {saved}, this model: {found}); load it onto the base model it was trained on, or skip this check with `load_adapter_with(dir, &LoadOptions::default().with_verify_base(false))`",
        file.display()
    )]
    BaseMismatch {
        /// The adapter file.
        file: PathBuf,
        /// The module path whose base weight differs.
        module: String,
        /// The fingerprint stored in the file.
        saved: String,
        /// The fingerprint of the model's weight.
        found: String,
    },

    /// A tensor in an adapter file names a module that is not a LoRA layer of the model.
    #[error(
        "{}: tensor `{key}` targets module `{module}`, which is not a LoRA layer of this model{}",
        file.display(),
        hint(known)
    )]
    UnknownModule {
        /// The adapter file.
        file: PathBuf,
        /// The tensor key.
        key: String,
        /// The module path the key names.
        module: String,
        /// A few module paths the model does have, as a hint.
        known: Vec<String>,
    },

    /// A layer-level operation was refused (shape mismatch, no adapter, ...).
    #[error("{}: {source}", layer_name(path))]
    Layer {
        /// The module path of the layer (empty for a layer used on its own as a model).
        path: String,
        /// What went wrong, as the layer reported it.
        source: LayerError,
    },

    /// `merge()` on a layer that is already merged, or an operation that needs unmerged weights.
    #[error("{} is merged: call `unmerge()` first", layer_name(path))]
    Merged {
        /// The module path of the layer.
        path: String,
    },

    /// `unmerge()` on a model none of whose layers is merged.
    #[error("the model is not merged: nothing to unmerge")]
    NotMerged,

    /// A merge would produce NaN or infinite weights; nothing was changed.
    #[error(
        "{}: merging the adapter gives non-finite weights (NaN or inf); the layer is unchanged",
        layer_name(path)
    )]
    NonFinite {
        /// The module path of the layer (or the tensor key, for `lora merge`).
        path: String,
    },

    /// A path is not what was expected: a file where an adapter directory is expected, a
    /// directory without model files, something that is not a regular file.
    #[error("{}: {reason}", path.display())]
    InvalidPath {
        /// The path at fault.
        path: PathBuf,
        /// What was expected there.
        reason: String,
    },

    /// A text file (an adapter config) is not UTF-8.
    #[error("{}: not UTF-8 text: {source}", path.display())]
    NotUtf8 {
        /// The file at fault.
        path: PathBuf,
        /// Where the decoding failed.
        source: std::string::FromUtf8Error,
    },

    /// A lock guarding shared state (a `VarMap`) was poisoned by a thread that panicked while
    /// holding it.
    #[error("the lock of {what} is poisoned: a thread panicked while holding it")]
    LockPoisoned {
        /// What the lock guards.
        what: String,
    },

    /// An adapter name the model does not have.
    #[error("no adapter named `{name}`{}", if known.is_empty() { " (the model has no adapters)".to_string() } else { format!(" (adapters: `{}`)", known.join("`, `")) })]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the model has.
        known: Vec<String>,
    },

    /// No LoRA layer has an adapter where one is needed (`what` names the operation).
    #[error("no LoRA layer has an adapter: nothing to {what}")]
    NoAdapter {
        /// The operation that needed an adapter, e.g. `merge` or `save`.
        what: String,
    },

    /// A training step cannot go on: a non-finite loss or gradient, a gradient of the wrong
    /// shape, an optimizer state that does not fit the variables.
    #[error("training: {reason}")]
    Training {
        /// What went wrong, with the step and the variable where known.
        reason: String,
    },

    /// The model has no LoRA layers at all.
    #[error("the model has no LoRA layers")]
    NoLoraLayers,

    /// `init_adapter` on a model whose LoRA layers are all `adaptable` (no `targets` with a
    /// default config): the adapter must be described at run time.
    #[error(
        "the model declares no default adapter (its LoRA layers {layers} have no `targets` config): \
         create one at run time with `init_adapter_with(&varmap, &InitOptions::default().with_peft_config(config))`"
    )]
    NoDefaultAdapter {
        /// Some of the model's LoRA layers.
        layers: String,
    },
}

/// What went wrong in one layer, before the model says which: a layer does not know its
/// module path, so its methods return this, and the model's visit attaches the path once with
/// [`LayerError::at`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// A tensor operation failed in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The operation needs an unmerged layer.
    #[error("is merged: call `unmerge()` first")]
    Merged,
    /// `unmerge` on a layer that is not merged.
    #[error("is not merged: nothing to unmerge")]
    NotMerged,
    /// The merged weight would hold NaN or inf.
    #[error("merging the adapter gives non-finite weights (NaN or inf)")]
    NonFinite,
    /// The operation needs an active adapter and the layer has none.
    #[error("the layer has no adapter")]
    NoAdapter,
    /// An adapter name the layer does not have.
    #[error("no adapter named `{name}` (adapters: {known:?})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the layer has.
        known: Vec<String>,
    },
    /// A factor does not fit the layer.
    #[error("{factor} has shape {found:?}, expected {expected}")]
    FactorShape {
        /// Which factor: `lora_A` or `lora_B`.
        factor: Factor,
        /// Its shape.
        found: Vec<usize>,
        /// The shape the layer needs, e.g. `[r, 64]`.
        expected: String,
    },
    /// A hyper-parameter is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The field at fault, e.g. `r`.
        field: String,
        /// Why the value is refused.
        reason: String,
    },
    /// The layer cannot do what was asked (training a merged layer, combining unequal ranks, ...).
    #[error("{0}")]
    Refused(String),
    /// The operation needs a dense base weight and the layer's is quantized (a QLoRA layer).
    #[error("the base weight is quantized (GGUF): {0}")]
    Quantized(String),
}

impl LayerError {
    /// [`LayerError::Quantized`], saying what was asked.
    pub(crate) fn quantized(what: &str) -> Self {
        Self::Quantized(what.to_string())
    }

    /// The refusal of a DoRA adapter (`use_dora`) by a layer kind without DoRA (embeddings,
    /// convolutions, custom kinds that do not override
    /// [`supports_dora`](crate::LoraLayer::supports_dora)).
    pub(crate) fn adalora_unsupported() -> Self {
        Self::Refused(
            "AdaLoRA is supported on linear layers only: this layer kind (an embedding, a \
             convolution, ...) takes plain LoRA adapters"
                .into(),
        )
    }

    pub(crate) fn dora_unsupported() -> Self {
        Self::Refused(
            "DoRA (`use_dora`) is supported on linear layers with a dense base only: this layer \
             (an embedding, a convolution, a quantized base, ...) takes plain LoRA adapters"
                .into(),
        )
    }
}

/// Which trainable tensor of an adapter: `A` (`[r, in]`), `B` (`[out, r]`) or DoRA's magnitude
/// (`[out]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Factor {
    /// `lora_A`, `[r, in]`.
    A,
    /// `lora_B`, `[out, r]`.
    B,
    /// `lora_magnitude_vector`, `[out]`: DoRA's magnitude per output feature.
    Magnitude,
    /// `lora_E`, `[r, 1]`: AdaLoRA's singular values.
    E,
}

impl std::fmt::Display for Factor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
            Factor::Magnitude => "lora_magnitude_vector",
            Factor::E => "lora_E",
        })
    }
}

/// A `Result` whose error is a [`LayerError`].
pub type LayerResult<T> = std::result::Result<T, LayerError>;

impl LayerError {
    /// The model-level error for this fault in the layer at `path`: the one place where a
    /// layer's error gets its module path.
    pub fn at(self, path: &str) -> Error {
        let path = path.to_string();
        match self {
            LayerError::Candle(e) => Error::Candle(e),
            LayerError::Merged => Error::Merged { path },
            LayerError::NonFinite => Error::NonFinite { path },
            LayerError::InvalidConfig { field, reason } => Error::InvalidConfig {
                file: None,
                field,
                reason,
            },
            source => Error::Layer { path, source },
        }
    }
}

/// `layer `path``, or `the layer` for a layer used on its own (the root path).
fn layer_name(path: &str) -> String {
    if path.is_empty() {
        "the layer".to_string()
    } else {
        format!("layer `{path}`")
    }
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!(" in {}", f.display()),
        None => String::new(),
    }
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!("{}: ", f.display()),
        None => String::new(),
    }
}

fn hint(known: &[String]) -> String {
    if known.is_empty() {
        " (the model has no LoRA layers)".to_string()
    } else {
        format!(" (LoRA layers include `{}`)", known.join("`, `"))
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_tensor(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::BadTensor {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}
