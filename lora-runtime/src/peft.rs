//! Adapter directories in Hugging Face PEFT's format.
//!
//! A directory holds `adapter_model.safetensors` (tensors
//! `base_model.model.<module path>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`,
//! metadata `format: pt`) and `adapter_config.json`. [`AdapterFile::read`] parses and validates
//! one without a model; [`LoraModel::load_adapter`](crate::LoraModel::load_adapter) and
//! [`LoraModel::save_adapter`](crate::LoraModel::save_adapter) use this module.
//!
//! Files are untrusted input: sizes are checked before anything is allocated
//! ([`MAX_ADAPTER_BYTES`], [`MAX_CONFIG_BYTES`], [`MAX_HEADER_BYTES`]), every malformation is a
//! specific [`Error`], and saves are atomic (both files staged, then renamed, rolled back on
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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use safetensors::{Dtype, SafeTensors, View};

use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::linear::{all_finite, Adapter, LoraLinear};
use crate::model::peft_key;

/// The tensor file of an adapter directory.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The config file of an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The `A` and `B` factors of one module, as read from a file (on the CPU, in the file's dtype).
#[derive(Debug, Clone)]
pub struct Factors {
    /// `A`, `[r, in]`.
    pub a: Tensor,
    /// `B`, `[out, r]`.
    pub b: Tensor,
    /// The key `A` was stored under.
    pub a_key: String,
    /// The key `B` was stored under.
    pub b_key: String,
}

impl Factors {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims().first().copied().unwrap_or(0)
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

/// The safetensors metadata key under which [`LoraModel::save_adapter`](crate::LoraModel::save_adapter)
/// records the fingerprint of a module's base weight: `lora.base_fingerprint.<module path>`.
/// PEFT ignores metadata it does not know, so files with these entries still load there.
pub const FINGERPRINT_PREFIX: &str = "lora.base_fingerprint.";

/// What an adapter file records about the base weight of one target: its stored shape and dtype
/// and a 64-bit [XXH3](https://xxhash.com) hash of its little-endian bytes in row-major order
/// (in Python: `xxhash.xxh3_64_hexdigest(weight.contiguous().numpy().tobytes())`).
///
/// It detects an adapter loaded onto the wrong base model (a different checkpoint, a different
/// fine-tune); it is not a defence against a forger. Written as metadata
/// `lora.base_fingerprint.<module path>` = `"<dims joined by x> <dtype> xxh3:<16 hex digits>"`,
/// e.g. `"64x32 f32 xxh3:0123456789abcdef"`. Hashing a 4096 x 4096 f32 weight (64 MiB) takes
/// about 15 ms on one core (it runs at memory speed).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lora_runtime::peft::BaseFingerprint;
/// let w = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let fp = BaseFingerprint::of(&w)?;
/// assert_eq!(fp.shape, [4, 3]);
/// assert_eq!(BaseFingerprint::parse(&fp.to_string()), Some(fp));
/// # Ok::<(), lora_runtime::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseFingerprint {
    /// The weight's shape as stored (`[out, in]`, or `[in, out]` with `fan_in_fan_out`).
    pub shape: Vec<usize>,
    /// The weight's dtype.
    pub dtype: DType,
    /// XXH3-64 of the weight's little-endian bytes.
    pub hash: u64,
}

impl BaseFingerprint {
    /// The fingerprint of `weight` (copied to the CPU when it lives elsewhere).
    ///
    /// # Errors
    /// A candle error when the tensor cannot be read.
    pub fn of(weight: &Tensor) -> Result<Self> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let cpu = weight.to_device(&Device::Cpu)?.contiguous()?;
        {
            let (storage, layout) = cpu.storage_and_layout();
            let (start, end) = layout.contiguous_offsets().unwrap_or((0, 0));
            match &*storage {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::F16(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                Storage::Cpu(CpuStorage::F64(v)) => {
                    hash_le(&mut hasher, &v[start..end], |x| x.to_le_bytes())
                }
                _ => {
                    drop(storage);
                    let values = cpu.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                    hash_le(&mut hasher, &values, |x| x.to_le_bytes());
                }
            }
        }
        Ok(Self {
            shape: weight.dims().to_vec(),
            dtype: weight.dtype(),
            hash: hasher.digest(),
        })
    }

    /// Parses the metadata form written by [`Display`](std::fmt::Display); `None` when malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let (dims, dtype, hash) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let shape = dims
            .split('x')
            .map(|d| d.parse::<usize>().ok())
            .collect::<Option<Vec<_>>>()?;
        let dtype = match dtype {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "f64" => DType::F64,
            _ => return None,
        };
        let hex = hash.strip_prefix("xxh3:").filter(|h| h.len() == 16)?;
        let hash = u64::from_str_radix(hex, 16).ok()?;
        Some(Self { shape, dtype, hash })
    }

    /// Whether `other` (the model's weight) may be the base this fingerprint was taken from:
    /// same shape and, when the dtypes agree, the same hash. A different dtype is a legitimate
    /// cast of the same base (trained in f32, served in bf16) whose bytes differ, so then only
    /// the shape is compared.
    pub fn matches(&self, other: &Self) -> bool {
        self.shape == other.shape && (self.dtype != other.dtype || self.hash == other.hash)
    }
}

/// Feeds the little-endian bytes of `values` to `hasher`: on little-endian machines the memory
/// itself, elsewhere through a small buffer (never a copy of the whole tensor).
fn hash_le<T: bytemuck::Pod, const N: usize>(
    hasher: &mut xxhash_rust::xxh3::Xxh3,
    values: &[T],
    le: impl Fn(&T) -> [u8; N],
) {
    if cfg!(target_endian = "little") {
        hasher.update(bytemuck::cast_slice(values));
        return;
    }
    let mut buf = [0u8; 1 << 16];
    for chunk in values.chunks(buf.len() / N.max(1)) {
        let n = chunk.len() * N;
        for (dst, x) in buf[..n].chunks_exact_mut(N).zip(chunk) {
            dst.copy_from_slice(&le(x));
        }
        hasher.update(&buf[..n]);
    }
}

impl std::fmt::Display for BaseFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(usize::to_string).collect();
        write!(
            f,
            "{} {} xxh3:{:016x}",
            dims.join("x"),
            self.dtype.as_str(),
            self.hash
        )
    }
}

/// A factor read from a file, with its key (`None` until seen).
type KeyedTensor = Option<(String, Tensor)>;

/// Which factor a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

/// Splits a PEFT key into module path and factor: accepts `base_model.model.` or not, and an
/// adapter-name infix (`lora_A.default.weight`).
fn parse_key(key: &str, file: &Path) -> Result<(String, Factor)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    for unsupported in [
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    ] {
        if parts.contains(&unsupported) {
            let what = if unsupported == "lora_magnitude_vector" {
                "DoRA magnitude vectors are not supported"
            } else {
                "LoRA on embedding layers is not supported"
            };
            return Err(Error::Unsupported {
                path: file.to_path_buf(),
                field: key.to_string(),
                reason: what.to_string(),
            });
        }
    }
    let pos = parts.iter().position(|p| *p == "lora_A" || *p == "lora_B");
    let Some(pos) = pos.filter(|&p| p > 0) else {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected `<module>.lora_A.weight` or `<module>.lora_B.weight`",
        ));
    };
    let tail = &parts[pos + 1..];
    if !(tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight" && !tail[0].is_empty())) {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected the key to end in `lora_A.weight`, `lora_B.weight` or `lora_A.<adapter>.weight`",
        ));
    }
    let factor = if parts[pos] == "lora_A" {
        Factor::A
    } else {
        Factor::B
    };
    Ok((parts[..pos].join("."), factor))
}

pub(crate) fn candle_of(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Reads a whole file, naming it on error.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads a whole file after checking that it is a regular file of at most `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "is not a regular file"),
        ));
    }
    if meta.len() > limit {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            what: "the file".into(),
            size: meta.len(),
            limit_what: "the limit".into(),
            limit,
        });
    }
    read_bytes(path)
}

/// Parses an `adapter_config.json` text and refuses unsupported features and invalid values.
fn parse_config(text: &str, path: &Path) -> Result<LoraConfig> {
    let config = LoraConfig::parse(text, path)?;
    config.check_supported(path)?;
    Ok(config)
}

/// Checks the header length a safetensors file declares in its first 8 bytes against the file
/// size and [`MAX_HEADER_BYTES`], with an error that says which.
fn check_header_length(bytes: &[u8], path: &Path) -> Result<()> {
    let Some(prefix) = bytes.get(..8).and_then(|p| <[u8; 8]>::try_from(p).ok()) else {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            what: "the 8-byte header length".into(),
            size: 8,
            limit_what: "the file".into(),
            limit: bytes.len() as u64,
        });
    };
    let declared = u64::from_le_bytes(prefix);
    if declared > MAX_HEADER_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            what: "the declared safetensors header".into(),
            size: declared,
            limit_what: "the limit".into(),
            limit: MAX_HEADER_BYTES,
        });
    }
    let available = bytes.len() as u64 - 8;
    if declared > available {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            what: "the declared safetensors header".into(),
            size: declared,
            limit_what: "the rest of the file (truncated?)".into(),
            limit: available,
        });
    }
    Ok(())
}

/// The `lora.base_fingerprint.<module>` entries of a safetensors header's metadata.
fn read_fingerprints(
    metadata: Option<&HashMap<String, String>>,
    factors: &BTreeMap<String, Factors>,
    file: &Path,
) -> Result<BTreeMap<String, BaseFingerprint>> {
    let mut out = BTreeMap::new();
    for (key, value) in metadata.into_iter().flatten() {
        let Some(module) = key.strip_prefix(FINGERPRINT_PREFIX) else {
            continue;
        };
        let bad = |reason: String| Error::BadMetadata {
            file: file.to_path_buf(),
            key: key.clone(),
            reason,
        };
        if !factors.contains_key(module) {
            return Err(bad(format!(
                "names module `{module}`, which has no LoRA factors in this file"
            )));
        }
        let fp = BaseFingerprint::parse(value).ok_or_else(|| {
            bad(format!("`{value}` is not a fingerprint: expected `<dims joined by x> <dtype> xxh3:<16 hex digits>`"))
        })?;
        out.insert(module.to_string(), fp);
    }
    Ok(out)
}

/// Parses a safetensors buffer, naming the file on error.
pub(crate) fn parse_safetensors<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|source| Error::SafeTensors {
        path: path.to_path_buf(),
        source,
    })
}

/// Locates `adapter_model.safetensors` and `adapter_config.json` from a directory, or from the
/// safetensors file itself.
fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok((path.join(ADAPTER_FILE), path.join(CONFIG_FILE)));
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        let dir = path.parent().unwrap_or(Path::new("."));
        return Ok((path.to_path_buf(), dir.join(CONFIG_FILE)));
    }
    Err(Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a file, expected an adapter directory (with adapter_model.safetensors and adapter_config.json)",
        ),
    ))
}

impl AdapterFile {
    /// Reads and validates an adapter directory (or its `adapter_model.safetensors`): the config
    /// uses only supported features, every key is a LoRA factor, every factor is a finite
    /// floating-point matrix, each module has both `A` and `B` with agreeing ranks, and the ranks
    /// agree with the config's `r` and `rank_pattern`.
    ///
    /// Sizes are checked before anything is allocated: the files against
    /// [`MAX_ADAPTER_BYTES`] and [`MAX_CONFIG_BYTES`], the declared header length against the
    /// file size and [`MAX_HEADER_BYTES`], every tensor's data offsets against the file.
    ///
    /// # Errors
    /// An error naming the file, key or field at fault: [`Error::Io`] (missing or unreadable
    /// file, a path that is a file where a directory is expected), [`Error::TooLarge`],
    /// [`Error::SafeTensors`], [`Error::Json`], [`Error::Unsupported`],
    /// [`Error::InvalidConfig`], [`Error::BadTensor`] or [`Error::BadMetadata`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let (tensor_path, config_path) = locate(path.as_ref())?;
        let config_text = read_limited(&config_path, MAX_CONFIG_BYTES)?;
        let config_text = String::from_utf8(config_text).map_err(|e| {
            Error::io(
                &config_path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not UTF-8 text: {e}"),
                ),
            )
        })?;
        let config = parse_config(&config_text, &config_path)?;
        let bytes = read_limited(&tensor_path, MAX_ADAPTER_BYTES)?;
        Self::from_parts(&bytes, config, &tensor_path, &config_path)
    }

    /// Parses and validates an adapter from memory: the bytes of `adapter_model.safetensors` and
    /// the text of `adapter_config.json`, with the same checks as [`read`](Self::read). `path`
    /// (the tensor file's) is only used in error messages and as [`AdapterFile::path`]; the
    /// config is named as `adapter_config.json` next to it.
    ///
    /// ```
    /// use lora_runtime::peft::AdapterFile;
    /// let err = AdapterFile::from_bytes(b"\x02\0\0\0\0\0\0\0{x", "{}", "x/adapter_model.safetensors")
    ///     .unwrap_err();
    /// assert!(err.to_string().contains("not a valid safetensors file"), "{err}");
    /// ```
    ///
    /// # Errors
    /// As [`read`](Self::read), except for the I/O errors.
    pub fn from_bytes(
        tensor_bytes: &[u8],
        config_text: &str,
        path: impl AsRef<Path>,
    ) -> Result<Self> {
        let tensor_path = path.as_ref();
        let config_path = tensor_path.with_file_name(CONFIG_FILE);
        let config = parse_config(config_text, &config_path)?;
        Self::from_parts(tensor_bytes, config, tensor_path, &config_path)
    }

    fn from_parts(
        bytes: &[u8],
        config: LoraConfig,
        tensor_path: &Path,
        config_path: &Path,
    ) -> Result<Self> {
        let file = tensor_path;
        check_header_length(bytes, file)?;
        let st = parse_safetensors(bytes, file)?;
        let metadata = SafeTensors::read_metadata(bytes)
            .map_err(|source| Error::SafeTensors {
                path: file.to_path_buf(),
                source,
            })?
            .1;

        // Per module: `A` and `B` with the keys they were stored under.
        let mut halves: BTreeMap<String, (KeyedTensor, KeyedTensor)> = BTreeMap::new();
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for key in names {
            let view = st.tensor(key).map_err(|source| Error::SafeTensors {
                path: file.to_path_buf(),
                source,
            })?;
            let (module, factor) = parse_key(key, file)?;
            let dtype = candle_of(view.dtype()).ok_or_else(|| {
                Error::bad_tensor(
                    file,
                    key,
                    format!(
                        "dtype {:?} is not a floating-point type (F32, F16, BF16, F64)",
                        view.dtype()
                    ),
                )
            })?;
            if view.shape().len() != 2 {
                return Err(Error::bad_tensor(
                    file,
                    key,
                    format!("expected a matrix, got shape {:?}", view.shape()),
                ));
            }
            let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
            if !all_finite(&tensor)? {
                return Err(Error::bad_tensor(
                    file,
                    key,
                    "contains NaN or infinite values",
                ));
            }
            let slot = halves.entry(module).or_default();
            let slot = match factor {
                Factor::A => &mut slot.0,
                Factor::B => &mut slot.1,
            };
            if let Some((other, _)) = slot {
                return Err(Error::bad_tensor(
                    file,
                    key,
                    format!("the same factor is also stored as `{other}`"),
                ));
            }
            *slot = Some((key.to_string(), tensor));
        }

        let mut factors = BTreeMap::new();
        for (module, (a, b)) in halves {
            let ((a_key, a), (b_key, b)) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some((k, _)), None) => {
                    return Err(Error::bad_tensor(file, k, "has no matching lora_B"))
                }
                (None, Some((k, _))) => {
                    return Err(Error::bad_tensor(file, k, "has no matching lora_A"))
                }
                (None, None) => continue,
            };
            let (ra, rb) = (a.dims()[0], b.dims()[1]);
            if ra == 0 {
                return Err(Error::bad_tensor(file, a_key, "has rank 0"));
            }
            if ra != rb {
                return Err(Error::bad_tensor(
                    file,
                    b_key,
                    format!("has rank {rb} but `{a_key}` has rank {ra}"),
                ));
            }
            let expected = config.rank_for(&module);
            if expected != ra {
                return Err(Error::bad_tensor(
                    file,
                    a_key,
                    format!("has rank {ra} but {} says r = {expected} for `{module}` (field `r` / `rank_pattern`)", config_path.display()),
                ));
            }
            factors.insert(module, Factors { a, b, a_key, b_key });
        }
        if factors.is_empty() {
            return Err(Error::bad_tensor(
                file,
                "",
                "the file holds no LoRA factors",
            ));
        }
        let base_fingerprints = read_fingerprints(metadata.metadata().as_ref(), &factors, file)?;
        Ok(Self {
            path: tensor_path.to_path_buf(),
            config,
            factors,
            base_fingerprints,
        })
    }

    /// Checks the recorded [`BaseFingerprint`]s against the model's LoRA layers
    /// (`(module path, layer)`), each of which must be unmerged. Modules without a fingerprint
    /// (every module of a PEFT adapter) and modules the model lacks pass: the latter are
    /// refused by [`into_adapters`](Self::into_adapters).
    ///
    /// # Errors
    /// [`Error::BaseMismatch`] naming the first module whose base weight differs.
    pub fn verify_base(&self, layers: &[(&str, &LoraLinear)]) -> Result<()> {
        for (module, saved) in &self.base_fingerprints {
            let Some((_, layer)) = layers.iter().find(|(p, _)| p == module) else {
                continue;
            };
            let found = BaseFingerprint::of(layer.base_weight())?;
            if !saved.matches(&found) {
                return Err(Error::BaseMismatch {
                    file: self.path.clone(),
                    module: module.clone(),
                    saved: saved.to_string(),
                    found: found.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks every factor against the model's LoRA layers (`(module path, layer)`) and builds
    /// the adapters, in each layer's dtype and on its device. Changes nothing.
    ///
    /// # Errors
    /// [`Error::UnknownModule`] for a module that is not a LoRA layer, [`Error::BadTensor`] for
    /// a shape that does not fit its layer.
    pub fn into_adapters(self, layers: &[(&str, &LoraLinear)]) -> Result<HashMap<String, Adapter>> {
        let by_path: HashMap<&str, &LoraLinear> = layers.iter().copied().collect();
        let mut out = HashMap::new();
        for (module, f) in self.factors {
            let Some(layer) = by_path.get(module.as_str()) else {
                return Err(Error::UnknownModule {
                    file: self.path.clone(),
                    key: f.a_key,
                    known: layers.iter().take(3).map(|(p, _)| p.to_string()).collect(),
                    module,
                });
            };
            if let Err(Error::Layer { reason, .. }) =
                layer.check_adapter_shapes(f.a.dims(), f.b.dims(), &module)
            {
                let key = if reason.starts_with("lora_A") {
                    &f.a_key
                } else {
                    &f.b_key
                };
                return Err(Error::bad_tensor(
                    &self.path,
                    key.clone(),
                    format!(
                        "does not fit layer `{module}` (in = {}, out = {}): {reason}",
                        layer.in_features(),
                        layer.out_features()
                    ),
                ));
            }
            let (dtype, device) = (layer.adapter_dtype(), layer.weight().device());
            let a = Var::from_tensor(&f.a.to_dtype(dtype)?.to_device(device)?)?;
            let b = Var::from_tensor(&f.b.to_dtype(dtype)?.to_device(device)?)?;
            let adapter = Adapter::new(
                a,
                b,
                self.config.alpha_for(&module),
                self.config.use_rslora,
                self.config.dropout as f32,
            )?;
            out.insert(module, adapter);
        }
        Ok(out)
    }
}

/// A tensor's bytes for a safetensors file.
pub(crate) struct RawTensor<'a> {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Cow<'a, [u8]>,
}

impl View for RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The little-endian bytes of a float tensor (copied to the CPU).
pub(crate) fn tensor_bytes(t: &Tensor) -> Result<(Dtype, Vec<u8>)> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(Error::layer(
                "",
                format!("cannot store dtype {other:?} in an adapter file"),
            ));
        }
    })
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path next to `path` (same directory, so the rename is atomic).
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// The file-system operations a save performs, so tests can make them fail part-way (a writer
/// that fails after N bytes, a rename that fails), which permission tricks cannot do for root.
pub(crate) trait SaveFs {
    /// Creates (truncating) the file at `path` for writing.
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>>;
    /// Renames `from` over `to`.
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
}

/// The real file system.
pub(crate) struct RealFs;

impl SaveFs for RealFs {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>> {
        Ok(Box::new(std::fs::File::create(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// Writes `bytes` to a temporary file next to `path` and syncs it; returns the temporary path.
/// On failure the temporary file is removed.
fn stage(path: &Path, bytes: &[u8], fs: &dyn SaveFs) -> Result<PathBuf> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut w = fs.create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        w.write_all(bytes)
            .and_then(|()| w.flush())
            .map_err(|e| Error::io(&tmp, e))?;
        drop(w);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Renames each staged file over its target. The previous targets are kept as hard links (or
/// copies) until every rename succeeded; when one fails, the targets already replaced get their
/// previous content back, so the directory holds either the old pair or the new pair, never a
/// mix, and no temporary files.
fn replace_all(pairs: &[(PathBuf, &Path)], fs: &dyn SaveFs) -> Result<()> {
    let cleanup = |paths: &mut dyn Iterator<Item = &PathBuf>| {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut backups: Vec<Option<PathBuf>> = Vec::with_capacity(pairs.len());
    for (_, target) in pairs {
        if !target.is_file() {
            backups.push(None);
            continue;
        }
        let bak = temp_path_for(target);
        let kept =
            std::fs::hard_link(target, &bak).or_else(|_| std::fs::copy(target, &bak).map(|_| ()));
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&bak);
            cleanup(&mut backups.iter().flatten());
            cleanup(&mut pairs.iter().map(|(s, _)| s));
            return Err(Error::io(target, e));
        }
        backups.push(Some(bak));
    }
    for (i, (staged, target)) in pairs.iter().enumerate() {
        if let Err(e) = fs.rename(staged, target) {
            for ((_, done), bak) in pairs[..i].iter().zip(&backups) {
                let _ = match bak {
                    Some(bak) => std::fs::rename(bak, done),
                    None => std::fs::remove_file(done),
                };
            }
            cleanup(&mut backups.iter().flatten());
            cleanup(&mut pairs[i..].iter().map(|(s, _)| s));
            return Err(Error::io(target, e));
        }
    }
    cleanup(&mut backups.iter().flatten());
    Ok(())
}

/// `{"format": "pt"}`.
pub(crate) fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes `layers`' adapters to `dir` in PEFT's format, with the fingerprint of each layer's
/// unmerged base weight in the metadata.
pub(crate) fn save(dir: &Path, layers: &[(&str, &LoraLinear, &Adapter)]) -> Result<()> {
    save_with(dir, layers, &RealFs)
}

/// [`save`] through `fs`.
pub(crate) fn save_with(
    dir: &Path,
    layers: &[(&str, &LoraLinear, &Adapter)],
    fs: &dyn SaveFs,
) -> Result<()> {
    let mut adapters = Vec::with_capacity(layers.len());
    let mut tensors = Vec::with_capacity(2 * layers.len());
    let mut metadata = pt_metadata();
    for &(path, layer, ad) in layers {
        adapters.push((path, ad, layer.fan_in_fan_out()));
        for (factor, var) in [("lora_A", ad.a()), ("lora_B", ad.b())] {
            let (dtype, bytes) = tensor_bytes(var.as_tensor())?;
            tensors.push((
                peft_key(path, factor),
                RawTensor {
                    dtype,
                    shape: var.dims().to_vec(),
                    data: Cow::Owned(bytes),
                },
            ));
        }
        let fingerprint = BaseFingerprint::of(layer.base_weight())?;
        metadata.insert(
            format!("{FINGERPRINT_PREFIX}{path}"),
            fingerprint.to_string(),
        );
    }
    let config = config_for(&adapters)?.to_json()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensor_path = dir.join(ADAPTER_FILE);
    let config_path = dir.join(CONFIG_FILE);
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|source| Error::SafeTensors {
            path: tensor_path.clone(),
            source,
        })?;
    let staged_tensors = stage(&tensor_path, &bytes, fs)?;
    let staged_config = match stage(&config_path, config.as_bytes(), fs) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&staged_tensors);
            return Err(e);
        }
    };
    replace_all(
        &[
            (staged_tensors, &tensor_path),
            (staged_config, &config_path),
        ],
        fs,
    )
}

/// The most frequent value (ties: the first in sorted order).
fn mode<T: Copy + PartialEq>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.iter().rev().max_by_key(|(_, n)| *n).map(|(v, _)| *v)
}

/// The PEFT config describing `adapters` (`(path, adapter, fan_in_fan_out)`).
pub(crate) fn config_for(adapters: &[(&str, &Adapter, bool)]) -> Result<LoraConfig> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "no LoRA layer has an adapter: nothing to save".into(),
        ));
    }
    let rank = mode(adapters.iter().map(|(_, a, _)| a.rank())).unwrap_or(8);
    let use_rslora = mode(adapters.iter().map(|(_, a, _)| a.use_rslora())).unwrap_or(false);
    // PEFT has one `use_rslora` for the whole adapter: a layer with the other scaling is saved
    // with the alpha that gives its scaling under the global rule.
    let effective_alpha = |a: &Adapter| -> f64 {
        let r = (a.rank() as f64).sqrt();
        match (a.use_rslora(), use_rslora) {
            // alpha'/r = alpha/sqrt(r)
            (true, false) => a.alpha() * r,
            // alpha'/sqrt(r) = alpha/r
            (false, true) => a.alpha() / r,
            _ => a.alpha(),
        }
    };
    let alpha = mode(adapters.iter().map(|(_, a, _)| effective_alpha(a))).unwrap_or(8.0);
    let mut names: Vec<String> = adapters
        .iter()
        .map(|(p, _, _)| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    names.sort();
    names.dedup();
    let mut config = LoraConfig::new(rank, alpha, names);
    config.use_rslora = use_rslora;
    config.dropout = adapters
        .iter()
        .map(|(_, a, _)| f64::from(a.dropout()))
        .fold(0.0, f64::max);
    config.fan_in_fan_out = adapters.iter().any(|(_, _, f)| *f);
    for (path, ad, _) in adapters {
        if ad.rank() != rank {
            config.rank_pattern.insert((*path).to_string(), ad.rank());
        }
        let a = effective_alpha(ad);
        if a != alpha {
            config.alpha_pattern.insert((*path).to_string(), a);
        }
    }
    debug_assert!(matches!(config.targets, TargetModules::List(_)));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerConfig;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn layers(seed: u64) -> Vec<(String, LoraLinear)> {
        (0..2)
            .map(|i| {
                let w = Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap();
                let mut l = LoraLinear::new(w, None);
                l.init_adapter(&LayerConfig::new(2, 4.0), seed + i).unwrap();
                let b = Tensor::randn(0f32, 1.0, (6, 2), &Device::Cpu).unwrap();
                l.adapter().unwrap().b().set(&b).unwrap();
                (format!("layers.{i}.q"), l)
            })
            .collect()
    }

    fn pairs(layers: &[(String, LoraLinear)]) -> Vec<(&str, &LoraLinear)> {
        layers.iter().map(|(p, l)| (p.as_str(), l)).collect()
    }

    fn refs(layers: &[(String, LoraLinear)]) -> Vec<(&str, &LoraLinear, &Adapter)> {
        layers
            .iter()
            .map(|(p, l)| (p.as_str(), l, l.adapter().unwrap()))
            .collect()
    }

    /// A file system whose writers fail once `budget` bytes were written in all, and whose
    /// rename fails for the target file named `fail_rename`.
    struct Faulty {
        budget: usize,
        written: Arc<AtomicUsize>,
        fail_rename: Option<&'static str>,
    }

    struct FailAfter {
        inner: std::fs::File,
        budget: usize,
        written: Arc<AtomicUsize>,
    }

    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let done = self.written.load(Ordering::SeqCst);
            let left = self.budget.saturating_sub(done);
            if left == 0 {
                return Err(std::io::Error::other("injected failure: disk full"));
            }
            let n = self.inner.write(&buf[..buf.len().min(left)])?;
            self.written.fetch_add(n, Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    impl SaveFs for Faulty {
        fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>> {
            Ok(Box::new(FailAfter {
                inner: std::fs::File::create(path)?,
                budget: self.budget,
                written: self.written.clone(),
            }))
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            if self
                .fail_rename
                .is_some_and(|name| to.file_name().is_some_and(|n| n == name))
            {
                return Err(std::io::Error::other("injected failure: rename"));
            }
            std::fs::rename(from, to)
        }
    }

    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_save_that_fails_part_way_leaves_the_previous_adapter_and_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let old = layers(1);
        save(dir.path(), &refs(&old)).unwrap();
        let before = snapshot(dir.path());
        assert_eq!(before.len(), 2);
        let new = layers(7);
        let total = before.values().map(Vec::len).sum::<usize>();
        let tensor_len = before[ADAPTER_FILE].len();
        // Fail while writing the tensors, exactly at their end, while writing the config.
        let budgets = [
            0,
            1,
            8,
            100,
            tensor_len / 2,
            tensor_len - 1,
            tensor_len,
            tensor_len + 1,
            total - 1,
        ];
        for budget in budgets {
            let fs = Faulty {
                budget,
                written: Arc::default(),
                fail_rename: None,
            };
            let err = save_with(dir.path(), &refs(&new), &fs).unwrap_err();
            assert!(
                err.to_string().contains("injected failure: disk full"),
                "{budget}: {err}"
            );
            assert!(matches!(err, Error::Io { .. }), "{budget}: {err:?}");
            assert_eq!(snapshot(dir.path()), before, "budget {budget}");
        }
        // Fail the first rename, then the second (after the tensors were already replaced).
        for name in [ADAPTER_FILE, CONFIG_FILE] {
            let fs = Faulty {
                budget: usize::MAX,
                written: Arc::default(),
                fail_rename: Some(name),
            };
            let err = save_with(dir.path(), &refs(&new), &fs).unwrap_err();
            assert!(
                err.to_string().contains("injected failure: rename"),
                "{name}: {err}"
            );
            assert_eq!(snapshot(dir.path()), before, "failed rename of {name}");
        }
        // Without a fault the same file system writes the new adapter.
        let fs = Faulty {
            budget: usize::MAX,
            written: Arc::default(),
            fail_rename: None,
        };
        save_with(dir.path(), &refs(&new), &fs).unwrap();
        let after = snapshot(dir.path());
        assert_eq!(after.len(), 2);
        assert_ne!(after[ADAPTER_FILE], before[ADAPTER_FILE]);
    }

    #[test]
    fn a_failed_first_save_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Faulty {
            budget: 10,
            written: Arc::default(),
            fail_rename: None,
        };
        save_with(dir.path(), &refs(&layers(1)), &fs).unwrap_err();
        assert!(snapshot(dir.path()).is_empty());
        let fs = Faulty {
            budget: usize::MAX,
            written: Arc::default(),
            fail_rename: Some(CONFIG_FILE),
        };
        save_with(dir.path(), &refs(&layers(1)), &fs).unwrap_err();
        assert!(
            snapshot(dir.path()).is_empty(),
            "{:?}",
            snapshot(dir.path()).keys()
        );
    }

    #[test]
    fn fingerprints_are_recorded_round_trip_and_detect_another_base() {
        let dir = tempfile::tempdir().unwrap();
        let model = layers(1);
        save(dir.path(), &refs(&model)).unwrap();
        let file = AdapterFile::read(dir.path()).unwrap();
        assert_eq!(file.base_fingerprints.len(), 2);
        let fp = &file.base_fingerprints["layers.0.q"];
        assert_eq!(fp, &BaseFingerprint::of(model[0].1.weight()).unwrap());
        assert_eq!(
            fp.to_string().split(' ').take(2).collect::<Vec<_>>(),
            ["6x5", "f32"]
        );
        file.verify_base(&pairs(&model)).unwrap();
        let other = layers(1);
        let err = file.verify_base(&pairs(&other)).unwrap_err();
        assert!(
            matches!(&err, Error::BaseMismatch { module, .. } if module == "layers.0.q"),
            "{err}"
        );
        // A different dtype compares the shape only.
        let half: Vec<(String, LoraLinear)> = other
            .iter()
            .map(|(p, l)| {
                (
                    p.clone(),
                    LoraLinear::new(l.weight().to_dtype(DType::BF16).unwrap(), None),
                )
            })
            .collect();
        file.verify_base(&pairs(&half)).unwrap();
    }

    #[test]
    fn fingerprint_parsing_refuses_malformed_text() {
        for bad in [
            "",
            "6x5 f32",
            "6x5 f32 xxh3:0123",
            "6xx5 f32 xxh3:0123456789abcdef",
            "6x5 u8 xxh3:0123456789abcdef",
            "6x5 f32 sha:0123456789abcdef",
            "6x5 f32 xxh3:0123456789abcdeg",
            "6x5 f32 xxh3:0123456789abcdef extra",
        ] {
            assert_eq!(BaseFingerprint::parse(bad), None, "{bad}");
        }
        let fp = BaseFingerprint {
            shape: vec![6, 5],
            dtype: DType::BF16,
            hash: 0xabc,
        };
        assert_eq!(fp.to_string(), "6x5 bf16 xxh3:0000000000000abc");
        assert_eq!(BaseFingerprint::parse(&fp.to_string()), Some(fp));
    }

    /// The cost of a fingerprint of a 4096 x 4096 f32 weight (run with `--ignored --nocapture`
    /// in release mode).
    #[test]
    #[ignore]
    fn fingerprint_cost() {
        let w = Tensor::randn(0f32, 1.0, (4096, 4096), &Device::Cpu).unwrap();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let fp = BaseFingerprint::of(&w).unwrap();
            println!("fingerprint of 4096x4096 f32: {:?} ({fp})", t.elapsed());
        }
    }
}
