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
    #[error("{}: unsupported PEFT feature `{field}`: {reason}", path.display())]
    Unsupported {
        /// The file that asks for the feature.
        path: PathBuf,
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
    #[error("layer `{path}`: {reason}")]
    Layer {
        /// The module path of the layer (empty for a standalone layer).
        path: String,
        /// What went wrong.
        reason: String,
    },

    /// `merge()` on a layer that is already merged, or an operation that needs unmerged weights.
    #[error("layer `{path}` is merged: call `unmerge()` first")]
    Merged {
        /// The module path of the layer.
        path: String,
    },

    /// `unmerge()` on a layer that is not merged.
    #[error("layer `{path}` is not merged: nothing to unmerge")]
    NotMerged {
        /// The module path of the layer.
        path: String,
    },

    /// A merge would produce NaN or infinite weights; nothing was changed.
    #[error("layer `{path}`: merging the adapter gives non-finite weights (NaN or inf); the layer is unchanged")]
    NonFinite {
        /// The module path of the layer.
        path: String,
    },

    /// An adapter name the model does not have.
    #[error("no adapter named `{name}`{}", if known.is_empty() { " (the model has no adapters)".to_string() } else { format!(" (adapters: `{}`)", known.join("`, `")) })]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the model has.
        known: Vec<String>,
    },

    /// The model has no LoRA layers, or no adapter where one is needed.
    #[error("{0}")]
    NoAdapter(String),
}

fn in_file(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!(" in {}", f.display()),
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

    pub(crate) fn layer(path: &str, reason: impl Into<String>) -> Self {
        Error::Layer {
            path: path.to_string(),
            reason: reason.into(),
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
