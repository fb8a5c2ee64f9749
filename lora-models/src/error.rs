//! The error type of the model crate: every variant names the file, tensor or field at fault.

use std::path::PathBuf;

/// A `Result` whose error is [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;

/// What can go wrong loading, running or generating with a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A tensor operation failed in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An error of the LoRA runtime (adapters, merge).
    #[error(transparent)]
    Lora(#[from] lora_runtime::Error),

    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A JSON file (`config.json`, `tokenizer_config.json`, ...) does not parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// What the parser found.
        source: serde_json::Error,
    },

    /// The checkpoint asks for something this crate does not implement, or is inconsistent.
    #[error("{}: `{field}`: {reason}", path.display())]
    Unsupported {
        /// The file at fault.
        path: PathBuf,
        /// The config field, metadata key or tensor name.
        field: String,
        /// What is wrong and what is supported.
        reason: String,
    },

    /// A checkpoint lacks a tensor the model needs, or has one of the wrong shape.
    #[error("{}: tensor `{name}`: {reason}", path.display())]
    Tensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name as stored.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A path that is neither a GGUF file nor a model directory.
    #[error("{}: {reason}", path.display())]
    InvalidPath {
        /// The path at fault.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },

    /// An input the model cannot run (empty prompt, too long, a token id outside the vocabulary).
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
