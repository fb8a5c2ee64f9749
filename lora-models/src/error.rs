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

    /// A hub id that is not in the Hugging Face cache and could not be downloaded.
    #[error("model `{id}` (Hugging Face cache {}): {reason}", cache.display())]
    Hub {
        /// The hub id as given.
        id: String,
        /// The cache directory searched.
        cache: PathBuf,
        /// What failed.
        reason: String,
    },

    /// A line of a training data file that cannot be used.
    #[error("{}:{line}: {reason}", path.display())]
    Data {
        /// The data file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// An input the model cannot run (empty prompt, too long, a token id outside the vocabulary).
    #[error("{0}")]
    Input(String),

    /// A GGUF file lacks a metadata key the tokenizer needs.
    #[error("{}: no `{key}` metadata: the file holds no tokenizer that can be rebuilt", path.display())]
    MissingMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The missing key, e.g. `tokenizer.ggml.tokens`.
        key: String,
    },

    /// A GGUF metadata value or a config field has the wrong type or an impossible value.
    #[error("{}: `{field}`: {reason}", path.display())]
    InvalidField {
        /// The file at fault.
        path: PathBuf,
        /// The metadata key or JSON field, e.g. `tokenizer.ggml.bos_token_id` or `eos_token`.
        field: String,
        /// Why the value is refused.
        reason: String,
    },

    /// The GGUF file describes a tokenizer kind this crate does not rebuild.
    #[error(
        "{}: `tokenizer.ggml.model` is `{found}`, but only `gpt2` (byte-level BPE) is supported: \
         load the model's `tokenizer.json` with `TextTokenizer::from_hf_dir` instead",
        path.display()
    )]
    UnsupportedTokenizer {
        /// The GGUF file.
        path: PathBuf,
        /// The value of `tokenizer.ggml.model`, e.g. `llama` (sentencepiece).
        found: String,
    },

    /// A special token named by a config file is not in the vocabulary.
    #[error("{}: `{field}` is `{token}`, which is not in the vocabulary", path.display())]
    UnknownToken {
        /// The config file.
        path: PathBuf,
        /// The field naming the token, e.g. `eos_token`.
        field: String,
        /// The token's text.
        token: String,
    },

    /// No end-of-sequence token is stated anywhere.
    #[error(
        "{}: no end-of-sequence token: set `eos_token` in `tokenizer_config.json` or \
         `eos_token_id` in `generation_config.json`",
        path.display()
    )]
    MissingEosToken {
        /// The model directory or file.
        path: PathBuf,
    },

    /// The `tokenizers` library refused to build or load the tokenizer.
    #[error("{}: cannot build the tokenizer: {source}", path.display())]
    Tokenizer {
        /// The file the tokenizer came from.
        path: PathBuf,
        /// What `tokenizers` reported.
        source: tokenizers::Error,
    },

    /// Encoding text into token ids failed.
    #[error("cannot encode text: {source}")]
    Encode {
        /// What `tokenizers` reported.
        source: tokenizers::Error,
    },

    /// Decoding token ids into text failed.
    #[error("cannot decode token ids: {source}")]
    Decode {
        /// What `tokenizers` reported.
        source: tokenizers::Error,
    },

    /// A chat template failed to compile or to render (including its own `raise_exception`).
    #[error("chat template: cannot {what}: {source}")]
    Template {
        /// The stage that failed: `compile the template` or `render the messages`.
        what: &'static str,
        /// What minijinja reported, with the template line.
        source: minijinja::Error,
    },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
