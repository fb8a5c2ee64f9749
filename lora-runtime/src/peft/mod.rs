//! Adapter directories in Hugging Face PEFT's format.
//!
//! A directory holds `adapter_model.safetensors` (tensors
//! `base_model.model.<module path>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`;
//! a convolution's `[r, in, k...]` and `[out, r, 1...]`; an embedding's
//! `...lora_embedding_A` `[r, num_embeddings]` and `...lora_embedding_B` `[dim, r]`; for DoRA
//! also `...lora_magnitude_vector` `[out]`; metadata `format: pt`) and `adapter_config.json`.
//! [`AdapterFile::read`] parses and validates
//! one without a model; [`load_adapter`](crate::LoraModelExt::load_adapter) and
//! [`save_adapter`](crate::LoraModelExt::save_adapter) use this module.
//!
//! Files are untrusted input: sizes are checked before anything is allocated
//! ([`MAX_ADAPTER_BYTES`], [`MAX_CONFIG_BYTES`], [`MAX_HEADER_BYTES`]), every malformation is a
//! specific [`Error`](crate::Error), and saves are atomic (both files staged, then renamed, rolled back on
//! failure). Saved files also record a [`BaseFingerprint`] of each target's base weight.
//!
//! ```no_run
//! use lora_runtime::peft::AdapterFile;
//! let adapter = AdapterFile::read("my-adapter")?;
//! for (module, factors) in &adapter.factors {
//!     println!("{module}: rank {}", factors.rank());
//! }
//! # Ok::<(), lora_runtime::Error>(())
//! ```

mod bind;
mod convert;
mod keys;
mod read;
mod write;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Tensor;

pub use crate::fingerprint::BaseFingerprint;
pub(crate) use bind::load_adapter;
pub use convert::convert_to_lora;
pub(crate) use keys::{named_key, peft_key};
pub(crate) use read::{candle_of, parse_safetensors};
pub use write::SaveOptions;
pub(crate) use write::{adapter_config, save_adapter, serialize_tensors, tensor_bytes};

use crate::config::LoraConfig;
use crate::layout::FactorNames;

/// The tensor file of an adapter directory.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The config file of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The `A` and `B` factors of one module (and DoRA's magnitude, AdaLoRA's `E`), as read from a file (on the
/// CPU, in the file's dtype).
#[derive(Debug, Clone)]
pub struct Factors {
    /// `A`, `[r, in]` (a convolution's `[r, in, k...]`).
    pub a: Tensor,
    /// `B`, `[out, r]` (a convolution's `[out, r, 1...]`).
    pub b: Tensor,
    /// The key `A` was stored under.
    pub a_key: String,
    /// The key `B` was stored under.
    pub b_key: String,
    /// DoRA's magnitude `[out]` and the key it was stored under, for a DoRA adapter
    /// (`use_dora`; checked to be present exactly then).
    pub magnitude: Option<(String, Tensor)>,
    /// AdaLoRA's singular values `[r, 1]` and the key they were stored under, for an AdaLoRA
    /// adapter (`peft_type: ADALORA`; checked to be present exactly then).
    pub e: Option<(String, Tensor)>,
    /// The rank, checked to agree between `A`, `B` and the config when read.
    pub(crate) rank: usize,
    /// How the keys name the factors: `lora_A`/`lora_B` or `lora_embedding_A`/`_B`.
    pub(crate) names: FactorNames,
}

impl Factors {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// How the file names these factors: [`FactorNames::Embedding`] for
    /// `lora_embedding_A` / `lora_embedding_B` (an embedding layer), [`FactorNames::AdaLora`]
    /// for AdaLoRA's bare `lora_A` / `lora_E` / `lora_B`, else [`FactorNames::Lora`].
    pub fn names(&self) -> FactorNames {
        self.names
    }
}

/// A parsed and validated PEFT adapter directory.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// The `adapter_model.safetensors` path.
    pub path: PathBuf,
    /// The parsed `adapter_config.json`.
    pub config: LoraConfig,
    /// Factors by module path (without `base_model.model.`).
    pub factors: BTreeMap<String, Factors>,
    /// The fingerprints of the base weights the adapter was saved from, by module path (see
    /// [`BaseFingerprint`]); empty for adapters written by PEFT.
    pub base_fingerprints: BTreeMap<String, BaseFingerprint>,
}

/// The largest `adapter_model.safetensors` [`AdapterFile::read`] accepts: 64 GiB, far above a
/// rank-256 adapter on every linear layer of a 70B model (~13 GiB in f32). The file is read into
/// memory, so this bounds what a hostile or corrupt file can make us allocate.
pub const MAX_ADAPTER_BYTES: u64 = 64 << 30;
/// The largest `adapter_config.json` [`AdapterFile::read`] accepts: 16 MiB (PEFT writes a few KiB,
/// more only with long `rank_pattern` maps).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The largest safetensors JSON header accepted: 100 MB, the `safetensors` crate's own limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The safetensors metadata key under which [`save_adapter`](crate::LoraModelExt::save_adapter)
/// records the fingerprint of a module's base weight: `lora.base_fingerprint.<module path>`.
/// PEFT ignores metadata it does not know, so files with these entries still load there.
pub const FINGERPRINT_PREFIX: &str = "lora.base_fingerprint.";

/// Options of [`load_adapter_with`](crate::LoraModelExt::load_adapter_with).
///
/// ```
/// use lora_runtime::LoadOptions;
/// assert!(LoadOptions::default().verify_base);
/// assert!(!LoadOptions::default().with_verify_base(false).verify_base);
/// assert_eq!(LoadOptions::default().with_name("sum").name.as_deref(), Some("sum"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Compare the base-weight fingerprints recorded in the file (see [`BaseFingerprint`]) with
    /// the model's weights and refuse a mismatch with
    /// [`Error::BaseMismatch`](crate::Error::BaseMismatch). On by default; files without
    /// fingerprints pass.
    pub verify_base: bool,
    /// Load as the adapter of this name, without making it active (PEFT's
    /// `load_adapter(path, adapter_name)`); an adapter of that name is replaced. `None` (the
    /// default) loads it as `default` and makes it active.
    pub name: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            verify_base: true,
            name: None,
        }
    }
}

impl LoadOptions {
    /// Switches the base-weight check on or off.
    pub fn with_verify_base(mut self, verify_base: bool) -> Self {
        self.verify_base = verify_base;
        self
    }

    /// Loads as the adapter `name`, not made active.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}
