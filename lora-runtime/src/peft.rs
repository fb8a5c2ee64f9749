//! Adapter directories in Hugging Face PEFT's format.
//!
//! A directory holds `adapter_model.safetensors` (tensors
//! `base_model.model.<module path>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`,
//! metadata `format: pt`) and `adapter_config.json`. [`AdapterFile::read`] parses and validates
//! one without a model; [`LoraModel::load_adapter`](crate::LoraModel::load_adapter) and
//! [`LoraModel::save_adapter`](crate::LoraModel::save_adapter) use this module.
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

use candle_core::{DType, Device, Tensor, Var};
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
}

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
    for unsupported in ["lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"] {
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
    let factor = if parts[pos] == "lora_A" { Factor::A } else { Factor::B };
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
    /// # Errors
    /// An error naming the file, key or field at fault.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let (tensor_path, config_path) = locate(path.as_ref())?;
        let config = LoraConfig::from_file(&config_path)?;
        config.check_supported(&config_path)?;
        let bytes = read_bytes(&tensor_path)?;
        let st = parse_safetensors(&bytes, &tensor_path)?;
        let file = tensor_path.as_path();

        let mut halves: BTreeMap<String, (Option<(String, Tensor)>, Option<(String, Tensor)>)> = BTreeMap::new();
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for key in names {
            let view = st.tensor(key).map_err(|source| Error::SafeTensors { path: file.to_path_buf(), source })?;
            let (module, factor) = parse_key(key, file)?;
            let dtype = candle_of(view.dtype()).ok_or_else(|| {
                Error::bad_tensor(file, key, format!("dtype {:?} is not a floating-point type (F32, F16, BF16, F64)", view.dtype()))
            })?;
            if view.shape().len() != 2 {
                return Err(Error::bad_tensor(file, key, format!("expected a matrix, got shape {:?}", view.shape())));
            }
            let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
            if !all_finite(&tensor)? {
                return Err(Error::bad_tensor(file, key, "contains NaN or infinite values"));
            }
            let slot = halves.entry(module).or_default();
            let slot = match factor {
                Factor::A => &mut slot.0,
                Factor::B => &mut slot.1,
            };
            if let Some((other, _)) = slot {
                return Err(Error::bad_tensor(file, key, format!("the same factor is also stored as `{other}`")));
            }
            *slot = Some((key.to_string(), tensor));
        }

        let mut factors = BTreeMap::new();
        for (module, (a, b)) in halves {
            let ((a_key, a), (b_key, b)) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some((k, _)), None) => return Err(Error::bad_tensor(file, k, "has no matching lora_B")),
                (None, Some((k, _))) => return Err(Error::bad_tensor(file, k, "has no matching lora_A")),
                (None, None) => continue,
            };
            let (ra, rb) = (a.dims()[0], b.dims()[1]);
            if ra == 0 {
                return Err(Error::bad_tensor(file, a_key, "has rank 0"));
            }
            if ra != rb {
                return Err(Error::bad_tensor(file, b_key, format!("has rank {rb} but `{a_key}` has rank {ra}")));
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
            return Err(Error::bad_tensor(file, "", "the file holds no LoRA factors"));
        }
        Ok(Self { path: tensor_path, config, factors })
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
            if let Err(Error::Layer { reason, .. }) = layer.check_adapter_shapes(f.a.dims(), f.b.dims(), &module) {
                let key = if reason.starts_with("lora_A") { &f.a_key } else { &f.b_key };
                return Err(Error::bad_tensor(
                    &self.path,
                    key.clone(),
                    format!("does not fit layer `{module}` (in = {}, out = {}): {reason}", layer.in_features(), layer.out_features()),
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
        DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::F16 => (Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DType::F64 => (Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
        other => {
            return Err(Error::layer("", format!("cannot store dtype {other:?} in an adapter file")));
        }
    })
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path next to `path` (same directory, so the rename is atomic).
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Runs `write` on a temporary file next to `path`, syncs it, and renames it over `path`. On any
/// failure the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = write(&tmp).and_then(|()| {
        let f = std::fs::OpenOptions::new().read(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// `{"format": "pt"}`.
pub(crate) fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes `layers`' adapters to `dir` in PEFT's format.
pub(crate) fn save(dir: &Path, layers: &[(&str, &LoraLinear)]) -> Result<()> {
    let mut adapters = Vec::with_capacity(layers.len());
    let mut tensors = Vec::with_capacity(2 * layers.len());
    for (path, layer) in layers {
        let Some(ad) = layer.adapter() else { continue };
        adapters.push((*path, ad, layer.fan_in_fan_out()));
        for (factor, var) in [("lora_A", ad.a()), ("lora_B", ad.b())] {
            let (dtype, bytes) = tensor_bytes(var.as_tensor())?;
            tensors.push((
                peft_key(path, factor),
                RawTensor { dtype, shape: var.dims().to_vec(), data: Cow::Owned(bytes) },
            ));
        }
    }
    let config = config_for(&adapters)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensor_path = dir.join(ADAPTER_FILE);
    let bytes = safetensors::serialize(tensors, Some(pt_metadata()))
        .map_err(|source| Error::SafeTensors { path: tensor_path.clone(), source })?;
    write_file_atomically(&tensor_path, &bytes)?;
    write_file_atomically(&dir.join(CONFIG_FILE), config.to_json()?.as_bytes())
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
        return Err(Error::NoAdapter("no LoRA layer has an adapter: nothing to save".into()));
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
    config.dropout = adapters.iter().map(|(_, a, _)| f64::from(a.dropout())).fold(0.0, f64::max);
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
