//! Reading an adapter directory: bounded reads, parsing, and every check that needs no model
//! (supported features, key names, dtypes, finite values, ranks against the config).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::keys::parse_key;
use super::{
    AdapterFile, Factors, ADAPTER_FILE, CONFIG_FILE, FINGERPRINT_PREFIX, MAX_ADAPTER_BYTES,
    MAX_CONFIG_BYTES, MAX_HEADER_BYTES,
};
use crate::config::LoraConfig;
use crate::error::{Error, Factor, Result};
use crate::fingerprint::BaseFingerprint;
use crate::kernels::all_finite;
use crate::layout::FactorNames;

/// A factor read from a file, with its key and naming (`None` until seen).
type KeyedTensor = Option<(String, Tensor, FactorNames)>;

/// What a file holds for one module: `A`, `B`, DoRA's magnitude and AdaLoRA's `E`.
#[derive(Default)]
struct ModuleTensors {
    a: KeyedTensor,
    b: KeyedTensor,
    magnitude: KeyedTensor,
    e: KeyedTensor,
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
        return Err(Error::InvalidPath {
            path: path.to_path_buf(),
            reason: "is not a regular file".into(),
        });
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
    Err(Error::InvalidPath {
        path: path.to_path_buf(),
        reason: "is a file, expected an adapter directory (with adapter_model.safetensors and adapter_config.json)".into(),
    })
}

impl AdapterFile {
    /// Reads and validates an adapter directory (or its `adapter_model.safetensors`): the config
    /// uses only supported features, every key is a LoRA factor, every factor is a finite
    /// floating-point matrix, each module has both `A` and `B` with agreeing ranks, and the ranks
    /// agree with the config's `r` and `rank_pattern`; with `use_dora`, each module has a
    /// magnitude vector as long as `B` is high (and without it, none).
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
        let config_text = String::from_utf8(config_text).map_err(|source| Error::NotUtf8 {
            path: config_path.clone(),
            source,
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
        let mut halves: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for key in names {
            let view = st.tensor(key).map_err(|source| Error::SafeTensors {
                path: file.to_path_buf(),
                source,
            })?;
            let (module, factor, names) = parse_key(key, file)?;
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
            // Matrices; convolutions add 1 or 2 kernel dimensions (`A [r, in, k...]`); DoRA's
            // magnitude is a vector.
            let expected = match (factor, names) {
                (Factor::Magnitude, _) => {
                    (view.shape().len() != 1).then_some("a vector [out_features]")
                }
                (Factor::E, _) => (view.shape().len() != 2 || view.shape()[1] != 1)
                    .then_some("a column [r, 1] (AdaLoRA's singular values)"),
                (_, FactorNames::Embedding | FactorNames::AdaLora) => {
                    (view.shape().len() != 2).then_some("a matrix")
                }
                (_, FactorNames::Lora) => (!(2..=4).contains(&view.shape().len())).then_some(
                    "a matrix (linear layers) or a kernel of 1 or 2 spatial dimensions \
                     (Conv1d, Conv2d; Conv3d is not supported)",
                ),
            };
            if let Some(expected) = expected {
                return Err(Error::bad_tensor(
                    file,
                    key,
                    format!("expected {expected}, got shape {:?}", view.shape()),
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
                Factor::A => &mut slot.a,
                Factor::B => &mut slot.b,
                Factor::Magnitude => &mut slot.magnitude,
                Factor::E => &mut slot.e,
            };
            if let Some((other, _, _)) = slot {
                return Err(Error::bad_tensor(
                    file,
                    key,
                    format!("the same factor is also stored as `{other}`"),
                ));
            }
            *slot = Some((key.to_string(), tensor, names));
        }

        let mut factors = BTreeMap::new();
        for (module, ModuleTensors { a, b, magnitude, e }) in halves {
            let ((a_key, a, names), (b_key, b, b_names)) =
                match (a, b, magnitude.as_ref().or(e.as_ref())) {
                    (Some(a), Some(b), _) => (a, b),
                    (Some((k, _, names)), None, _) => {
                        let other = names.factor_name(Factor::B);
                        return Err(Error::bad_tensor(
                            file,
                            k,
                            format!("has no matching {other}"),
                        ));
                    }
                    (None, Some((k, _, names)), _) => {
                        let other = names.factor_name(Factor::A);
                        return Err(Error::bad_tensor(
                            file,
                            k,
                            format!("has no matching {other}"),
                        ));
                    }
                    (None, None, Some((k, _, _))) => {
                        return Err(Error::bad_tensor(
                            file,
                            k,
                            "has no matching lora_A and lora_B",
                        ))
                    }
                    (None, None, None) => continue,
                };
            if names != b_names {
                return Err(Error::bad_tensor(
                    file,
                    b_key,
                    format!(
                        "does not pair with `{a_key}`: one is an embedding factor, the other not"
                    ),
                ));
            }
            if a.rank() != b.rank() {
                return Err(Error::bad_tensor(
                    file,
                    b_key,
                    format!(
                        "has shape {:?} but `{a_key}` has shape {:?}: the factors of a convolution \
                         both have its kernel dimensions",
                        b.dims(),
                        a.dims()
                    ),
                ));
            }
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
            let e = match (e, config.adalora.is_some()) {
                (Some((k, e, _)), true) => {
                    if names != FactorNames::AdaLora {
                        return Err(Error::bad_tensor(
                            file,
                            a_key,
                            "is stored with `.weight`, but AdaLoRA's factors are bare parameters \
                             (`<module>.lora_A`, `.lora_E`, `.lora_B`)",
                        ));
                    }
                    if e.dims() != [ra, 1] {
                        return Err(Error::bad_tensor(
                            file,
                            k,
                            format!(
                                "has shape {:?} but `{a_key}` has rank {ra}: expected [{ra}, 1]",
                                e.dims()
                            ),
                        ));
                    }
                    Some((k, e))
                }
                (Some((k, _, _)), false) => {
                    return Err(Error::bad_tensor(
                        file,
                        k,
                        format!(
                            "is AdaLoRA's `lora_E` but {} does not say `peft_type: ADALORA`",
                            config_path.display()
                        ),
                    ))
                }
                (None, true) => {
                    return Err(Error::bad_tensor(
                        file,
                        a_key,
                        format!(
                            "{} says `peft_type: ADALORA` but `{module}` has no `lora_E`",
                            config_path.display()
                        ),
                    ))
                }
                (None, false) if names == FactorNames::AdaLora => {
                    return Err(Error::bad_tensor(
                        file,
                        a_key,
                        format!(
                            "has no `.weight` suffix, as AdaLoRA's factors, but {} does not say \
                             `peft_type: ADALORA` (a LoRA factor is `<module>.lora_A.weight`)",
                            config_path.display()
                        ),
                    ))
                }
                (None, false) => None,
            };
            let magnitude = magnitude.map(|(k, m, _)| (k, m));
            match (&magnitude, config.use_dora) {
                (Some((k, _)), true) if names == FactorNames::Embedding || a.rank() != 2 => {
                    let kind = if names == FactorNames::Embedding {
                        "embedding"
                    } else {
                        "convolution"
                    };
                    return Err(Error::Unsupported {
                        path: Some(file.to_path_buf()),
                        field: k.clone(),
                        reason: format!(
                            "DoRA on {kind} layers is not supported (`{module}`); only linear \
                             layers take a `lora_magnitude_vector`"
                        ),
                    });
                }
                (Some((k, m)), true) => {
                    let out = b.dims()[0];
                    if m.dims() != [out] {
                        return Err(Error::bad_tensor(
                            file,
                            k,
                            format!(
                                "has shape {:?} but `{b_key}` has {out} rows: expected [{out}]",
                                m.dims()
                            ),
                        ));
                    }
                }
                (Some((k, _)), false) => {
                    return Err(Error::bad_tensor(
                        file,
                        k,
                        format!(
                            "is a DoRA magnitude but {} does not set `use_dora: true`",
                            config_path.display()
                        ),
                    ))
                }
                (None, true) => {
                    return Err(Error::bad_tensor(
                        file,
                        a_key,
                        format!(
                        "{} sets `use_dora: true` but `{module}` has no `lora_magnitude_vector`",
                        config_path.display()
                    ),
                    ))
                }
                (None, false) => {}
            }
            factors.insert(
                module,
                Factors {
                    a,
                    b,
                    a_key,
                    b_key,
                    magnitude,
                    e,
                    rank: ra,
                    names,
                },
            );
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
}
