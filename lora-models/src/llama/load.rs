//! Loading a Llama-family checkpoint: a Hugging Face model directory (`config.json` plus
//! `model.safetensors` or a sharded index, memory-mapped) or a GGUF file of the `llama` or
//! `qwen2` architecture (hyper-parameters from the metadata, weights dequantized).
//!
//! GGUF files from llama.cpp's converter store the rows of `attn_q` and `attn_k` of Llama models
//! permuted (rotary pairs interleaved). They are put back in transformers' order here, as
//! transformers does when it loads a GGUF, so module semantics, and therefore PEFT adapters, are
//! the same whichever file a model came from.
//!
//! The LoRA layers of a GGUF-loaded model carry the fingerprint of their tensor as stored in the
//! file (GGML type and bytes), so an adapter saved on it records the file's weights whatever dtype
//! they were dequantized to.
//!
//! With [`Precision::Quantized`] the projections of a GGUF file stay quantized in memory (QLoRA:
//! [`LoraLinear::from_quantized`]); the q/k row permutation is then undone on the stored blocks,
//! row by row, which is exact (each row is quantized on its own). The embedding, the norms and a
//! tied LM head are f32.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lora_runtime::{BaseFingerprint, LoraLinear, LoraModel, ModulePath, QuantizedWeight};

use super::config::{LlamaConfig, RopeScaling};
use super::model::{LlamaForCausalLM, TokenEmbedding};
use crate::error::{ModelError, Result};

/// What a checkpoint path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checkpoint {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face model directory.
    HfDir(PathBuf),
}

impl Checkpoint {
    /// Classifies `path`: a `.gguf` file (by its magic bytes), or a directory with `config.json`.
    ///
    /// # Errors
    /// [`ModelError::Io`] for a missing path, [`ModelError::InvalidPath`] for anything else.
    pub fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
        if meta.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Checkpoint::HfDir(path.to_path_buf()));
            }
            return Err(ModelError::InvalidPath {
                path: path.to_path_buf(),
                reason:
                    "is a directory without config.json: expected a Hugging Face model directory"
                        .into(),
            });
        }
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| ModelError::io(path, e))?;
        if &magic == b"GGUF" {
            return Ok(Checkpoint::Gguf(path.to_path_buf()));
        }
        Err(ModelError::InvalidPath {
            path: path.to_path_buf(),
            reason: "is neither a GGUF file (no `GGUF` magic) nor a model directory".into(),
        })
    }
}

/// How a model's weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Every weight in a float dtype (GGUF tensors dequantized).
    Float(DType),
    /// The projections of a GGUF file as stored, quantized (QLoRA); everything else in f32.
    Quantized,
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Self::Float(dtype)
    }
}

impl Precision {
    /// The dtype of the float weights (and of the activations).
    pub fn float_dtype(self) -> DType {
        match self {
            Self::Float(dtype) => dtype,
            Self::Quantized => DType::F32,
        }
    }
}

/// Loads a model from a GGUF file or a Hugging Face directory, with float weights in `dtype`
/// (or, for a GGUF file, the projections kept quantized: [`Precision::Quantized`]).
///
/// # Errors
/// A [`ModelError`] naming the file and the field or tensor at fault; a Hugging Face directory
/// with [`Precision::Quantized`].
pub fn load_llama(
    path: &Path,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<LlamaForCausalLM> {
    let precision = precision.into();
    match Checkpoint::of(path)? {
        Checkpoint::Gguf(p) => load_gguf(&p, precision, device),
        Checkpoint::HfDir(p) => load_hf_dir(&p, float_only(&p, precision)?, device),
    }
}

/// The float dtype of `precision` for a checkpoint that has no quantized weights (`path`).
///
/// # Errors
/// [`ModelError::Unsupported`] for [`Precision::Quantized`].
pub(crate) fn float_only(path: &Path, precision: Precision) -> Result<DType> {
    match precision {
        Precision::Float(dtype) => Ok(dtype),
        Precision::Quantized => Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: "dtype".into(),
            reason: "quantized weights come from a GGUF file; this is a Hugging Face directory \
                     (load it with a float dtype)"
                .into(),
        }),
    }
}

/// Loads a Hugging Face model directory, memory-mapping the safetensors files.
///
/// # Errors
/// A [`ModelError`] naming the file and the field or tensor at fault.
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LlamaForCausalLM> {
    let config_path = dir.join("config.json");
    let config = LlamaConfig::from_hf_file(&config_path)?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let mut names: Vec<&String> = parsed.weight_map.values().collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                if n.contains('/') || n.contains('\\') || n.starts_with('.') {
                    return Err(ModelError::Unsupported {
                        path: index.clone(),
                        field: "weight_map".into(),
                        reason: format!("shard name `{n}` must be a plain file name"),
                    });
                }
                Ok(dir.join(n))
            })
            .collect::<Result<_>>()?
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.is_file() {
            return Err(ModelError::io(
                f,
                std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
            ));
        }
    }
    // SAFETY: the files are mapped read-only; a concurrent truncation by another process is
    // outside what any reader can defend against.
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            ModelError::InvalidPath {
                path: dir.to_path_buf(),
                reason: format!("its safetensors files cannot be read: {e}"),
            }
        })?;
    check_tensors(
        &config,
        dir,
        |name| st.get(name).ok().map(|view| view.shape().to_vec()),
        str::to_string,
    )?;
    let vb = VarBuilder::from_backend(Box::new(st), dtype, device.clone());
    // Every tensor and shape was checked: what is left are candle's own errors.
    Ok(LlamaForCausalLM::new(config, vb)?)
}

/// GGUF metadata reader for one architecture prefix.
struct Meta<'a> {
    content: &'a Content,
    arch: String,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            field: key.to_string(),
            reason: reason.into(),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => f64::from(*x),
            Value::I8(x) => f64::from(*x),
            Value::U16(x) => f64::from(*x),
            Value::I16(x) => f64::from(*x),
            Value::U32(x) => f64::from(*x),
            Value::I32(x) => f64::from(*x),
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            Value::F32(x) => f64::from(*x),
            Value::F64(x) => *x,
            other => return Err(self.bad(key, format!("expected a number, got {other:?}"))),
        };
        Ok(Some(n))
    }

    fn arch_usize(&self, key: &str) -> Result<usize> {
        let full = format!("{}.{key}", self.arch);
        match self.number(&full)? {
            Some(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as usize),
            Some(n) => Err(self.bad(&full, format!("expected a count, got {n}"))),
            None => Err(self.bad(&full, "missing from the GGUF metadata")),
        }
    }
}

/// The GGUF tensor name of each transformers parameter (without `.weight` / `.bias`).
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    let map = |rest: &str| -> Option<&'static str> {
        Some(match rest {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            _ => return None,
        })
    };
    let (stem, suffix) = hf.rsplit_once('.')?;
    let gguf = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.")?;
            let (n, module) = rest.split_once('.')?;
            format!("blk.{n}.{}", map(module)?)
        }
    };
    Some(format!("{gguf}.{suffix}"))
}

/// llama.cpp's converter permutation (`LlamaModel.permute`): rows `(heads, 2, d/2)` ->
/// `(heads, d/2, 2)`, the inverse of [`unpermute_rows`]. Applied to whatever is added to the rows of
/// a stored `attn_q` / `attn_k` (a merged delta, a LoRA `B`).
pub(crate) fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    w.reshape((heads, 2, half, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// The architecture of a GGUF file and what its tensor layout depends on.
#[derive(Debug, Clone)]
pub(crate) struct GgufArch {
    /// `general.architecture`: `llama` or `qwen2`.
    pub(crate) name: String,
    /// Attention heads (`<arch>.attention.head_count`).
    pub(crate) heads: usize,
    /// Key/value heads (`<arch>.attention.head_count_kv`, else `heads`).
    pub(crate) kv_heads: usize,
}

impl GgufArch {
    /// Reads and checks the architecture of `content` (the header of `path`).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] naming the metadata key: a missing architecture, one that is
    /// not Llama-family, missing head counts.
    pub(crate) fn of(path: &Path, content: &Content) -> Result<Self> {
        let name = match content.metadata.get("general.architecture") {
            Some(Value::String(a)) => a.clone(),
            _ => {
                return Err(ModelError::Unsupported {
                    path: path.to_path_buf(),
                    field: "general.architecture".into(),
                    reason: "missing".into(),
                })
            }
        };
        if !matches!(name.as_str(), "llama" | "qwen2") {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "general.architecture".into(),
                reason: format!("`{name}` is not a Llama-family architecture (`llama`, `qwen2`)"),
            });
        }
        let meta = Meta {
            content,
            arch: name.clone(),
            path,
        };
        let heads = meta.arch_usize("attention.head_count")?;
        let kv_heads = meta.arch_usize("attention.head_count_kv").unwrap_or(heads);
        Ok(Self {
            name,
            heads,
            kv_heads,
        })
    }

    /// The head count by which the rows of the stored tensor `name` are permuted (llama.cpp's
    /// converter does it to `attn_q` and `attn_k` of the `llama` architecture), or `None`.
    pub(crate) fn permuted_heads(&self, name: &str) -> Option<usize> {
        if self.name != "llama" {
            return None;
        }
        let stem = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))?;
        if stem.ends_with(".attn_q") {
            Some(self.heads)
        } else if stem.ends_with(".attn_k") {
            Some(self.kv_heads)
        } else {
            None
        }
    }
}

/// Loads a GGUF file of the `llama` (or `qwen2`) architecture, dequantizing every tensor to
/// a float dtype, or keeping the projections quantized ([`Precision::Quantized`]).
///
/// # Errors
/// A [`ModelError`] naming the file and the metadata key or tensor at fault: another
/// architecture, missing metadata, a missing or truncated tensor.
pub fn load_gguf(
    path: &Path,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<LlamaForCausalLM> {
    let (mut file, content) = open_gguf(path)?;
    load_gguf_content(path, &mut file, &content, precision.into(), device)
}

/// Opens a GGUF file and reads its header (metadata and tensor index).
///
/// # Errors
/// [`ModelError::Io`]; [`ModelError::Unsupported`] for a file that is not a readable GGUF.
pub(crate) fn open_gguf(path: &Path) -> Result<(File, Content)> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| ModelError::Unsupported {
        path: path.to_path_buf(),
        field: "header".into(),
        reason: format!("not a readable GGUF file: {e}"),
    })?;
    Ok((file, content))
}

/// [`load_gguf`] from a header already read (the tokenizer reads the same header).
pub(crate) fn load_gguf_content(
    path: &Path,
    file: &mut File,
    content: &Content,
    precision: Precision,
    device: &Device,
) -> Result<LlamaForCausalLM> {
    let dtype = precision.float_dtype();
    let layout = GgufArch::of(path, content)?;
    let (arch, heads, kv_heads) = (layout.name.clone(), layout.heads, layout.kv_heads);
    let meta = Meta {
        content,
        arch: arch.clone(),
        path,
    };
    let hidden = meta.arch_usize("embedding_length")?;
    let vocab = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims().first().copied().unwrap_or(0),
        None => {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
                reason: "missing from the file".into(),
            })
        }
    };
    let head_dim = meta
        .arch_usize("attention.key_length")
        .unwrap_or(hidden / heads.max(1));
    let has_bias = content.tensor_infos.contains_key("blk.0.attn_q.bias");
    let rope_scaling = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let t = content
            .tensor(file, "rope_freqs.weight", &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| tensor_error(path, "rope_freqs.weight", e))?;
        RopeScaling::Factors(t)
    } else {
        RopeScaling::None
    };
    let token_id = |key: &str| -> Result<Option<u32>> { Ok(meta.number(key)?.map(|n| n as u32)) };
    let config = LlamaConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta.arch_usize("feed_forward_length")?,
        num_hidden_layers: meta.arch_usize("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .number(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta
            .number(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: meta.arch_usize("context_length").unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: has_bias,
        mlp_bias: false,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
            .into_iter()
            .collect(),
    };
    config.check(path)?;

    check_tensors(
        &config,
        path,
        |name| {
            let gguf = gguf_name(name)?;
            content
                .tensor_infos
                .get(&gguf)
                .map(|i| i.shape.dims().to_vec())
        },
        |name| gguf_name(name).unwrap_or_else(|| name.to_string()),
    )?;

    // Dequantize every tensor the model needs, under transformers' names; with
    // `Precision::Quantized` keep the projections' blocks, the model getting a placeholder that
    // takes no memory (a broadcast zero) until the layer is swapped for its quantized form.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut fingerprints: HashMap<String, BaseFingerprint> = HashMap::new();
    let mut quantized: HashMap<String, QuantizedWeight> = HashMap::new();
    for (hf, shape) in expected_tensors(&config) {
        let gguf = gguf_name(&hf).unwrap_or_else(|| hf.clone());
        let projection = hf
            .strip_suffix(".weight")
            .filter(|m| precision == Precision::Quantized && is_projection(m));
        let (qtensor, fingerprint) = read_tensor(file, content, &gguf, path, &layout, device)?;
        if let Some(module) = hf.strip_suffix(".weight") {
            fingerprints.insert(module.to_string(), fingerprint);
        }
        if let Some(module) = projection {
            let weight = QuantizedWeight::new(qtensor).map_err(|e| tensor_error(path, &gguf, e))?;
            quantized.insert(module.to_string(), weight);
            let placeholder = Tensor::zeros((), dtype, device)
                .and_then(|z| z.broadcast_as(shape))
                .map_err(|e| tensor_error(path, &gguf, e))?;
            tensors.insert(hf, placeholder);
            continue;
        }
        let t = qtensor
            .dequantize(device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| tensor_error(path, &gguf, e))?;
        tensors.insert(hf, t);
    }
    if config.tie_word_embeddings {
        if let Some(fp) = fingerprints.get("model.embed_tokens").cloned() {
            fingerprints.insert("lm_head".into(), fp);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    // Every tensor and shape was checked: what is left are candle's own errors.
    let mut model = LlamaForCausalLM::new(config, vb)?;
    install_quantized(&mut model, quantized)?;
    attach_fingerprints(&mut model, &fingerprints)?;
    Ok(model)
}

/// Whether the module `path` is one a quantized model keeps quantized: the attention and MLP
/// projections, the embedding table and an untied LM head (a tied one shares the table).
fn is_projection(path: &str) -> bool {
    path == "lm_head" || path == EMBEDDING || path.ends_with("_proj")
}

const EMBEDDING: &str = "model.embed_tokens";

/// Reads the tensor `name` as stored (its blocks, onto `device`), with llama.cpp's q/k row
/// permutation undone on the rows' bytes (exact for every type: each row is quantized on its
/// own); and the fingerprint of the stored bytes.
fn read_tensor(
    file: &mut File,
    content: &Content,
    name: &str,
    path: &Path,
    layout: &GgufArch,
    device: &Device,
) -> Result<(QTensor, BaseFingerprint)> {
    let raw = read_raw(file, content, name, path)?;
    let info = tensor_info(content, name, path)?;
    let fingerprint = stored_fingerprint(info, &raw);
    let dims = info.shape.dims().to_vec();
    let raw =
        match layout.permuted_heads(name) {
            Some(heads) => unpermute_rows(&raw, dims.first().copied().unwrap_or(0), heads)
                .map_err(|reason| ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    reason,
                })?,
            None => raw,
        };
    let tensor = QStorage::from_data(std::borrow::Cow::Owned(raw), device, info.ggml_dtype)
        .and_then(|storage| QTensor::new(storage, dims))
        .map_err(|e| tensor_error(path, name, e))?;
    Ok((tensor, fingerprint))
}

/// llama.cpp's converter permutes the rows of q and k per head (`(heads, 2, d/2)` -> `(heads,
/// d/2, 2)`); this puts them back on the stored rows, each row's bytes moved whole: rows
/// `(heads, d/2, 2)` -> `(heads, 2, d/2)`, as transformers' `_reverse_permute_weights`.
fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    if rows == 0 || heads == 0 || !rows.is_multiple_of(2 * heads) || !raw.len().is_multiple_of(rows)
    {
        return Err(format!(
            "{rows} rows of {} bytes cannot be split into {heads} heads of rotary pairs",
            raw.len()
        ));
    }
    let (row, half) = (raw.len() / rows, rows / heads / 2);
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (h * 2 * half + i * 2 + j) * row;
                let to = (h * 2 * half + j * half + i) * row;
                out[to..to + row].copy_from_slice(&raw[from..from + row]);
            }
        }
    }
    Ok(out)
}

/// Swaps each placeholder for its quantized weight: the projections (keeping their bias), the
/// embedding table, and a tied LM head (the table's blocks, shared).
fn install_quantized(
    model: &mut LlamaForCausalLM,
    mut quantized: HashMap<String, QuantizedWeight>,
) -> Result<()> {
    if let Some(table) = quantized.remove(EMBEDDING) {
        if model.config().tie_word_embeddings {
            quantized.insert("lm_head".into(), table.clone());
        }
        model.model.embed_tokens = TokenEmbedding::Quantized(table);
    }
    if quantized.is_empty() {
        return Ok(());
    }
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |p, layer, _| {
        if let (Some(linear), Some(weight)) = (
            layer.as_any_mut().downcast_mut::<LoraLinear>(),
            quantized.remove(p.as_str()),
        ) {
            *linear = LoraLinear::from_quantized(weight, linear.bias().cloned());
        }
        Ok(())
    })?;
    Ok(())
}

pub(crate) fn tensor_error(path: &Path, name: &str, e: candle_core::Error) -> ModelError {
    ModelError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// Every parameter the model reads, in transformers' naming, with its shape; `lm_head.weight`
/// only when the embeddings are not tied.
fn expected_tensors(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (hidden, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (q, kv) = (
        config.num_attention_heads * config.head_dim,
        config.num_key_value_heads * config.head_dim,
    );
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, hidden]),
        ("model.norm.weight".to_string(), vec![hidden]),
    ];
    if !config.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    }
    // Mirrors the biases `Attention::new` and `Mlp::new` read.
    let o_bias = config.attention_bias && config.model_type != "qwen2";
    for i in 0..config.num_hidden_layers {
        let layer = |m: &str| format!("model.layers.{i}.{m}");
        let modules = [
            ("self_attn.q_proj", q, hidden, config.attention_bias),
            ("self_attn.k_proj", kv, hidden, config.attention_bias),
            ("self_attn.v_proj", kv, hidden, config.attention_bias),
            ("self_attn.o_proj", hidden, q, o_bias),
            ("mlp.gate_proj", inter, hidden, config.mlp_bias),
            ("mlp.up_proj", inter, hidden, config.mlp_bias),
            ("mlp.down_proj", hidden, inter, config.mlp_bias),
        ];
        for (m, rows, cols, bias) in modules {
            out.push((format!("{}.weight", layer(m)), vec![rows, cols]));
            if bias {
                out.push((format!("{}.bias", layer(m)), vec![rows]));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("{}.weight", layer(norm)), vec![hidden]));
        }
    }
    out
}

/// Checks that the checkpoint has every tensor `config` needs, with its shape, before anything
/// is built: `found(name)` is the shape stored under transformers' `name` (`None`: absent), and
/// `stored(name)` the name the file uses, for the error.
fn check_tensors(
    config: &LlamaConfig,
    path: &Path,
    found: impl Fn(&str) -> Option<Vec<usize>>,
    stored: impl Fn(&str) -> String,
) -> Result<()> {
    for (name, shape) in expected_tensors(config) {
        let reason = match found(&name) {
            None => "missing from the file".to_string(),
            Some(s) if s != shape => format!("has shape {s:?}, the config needs {shape:?}"),
            Some(_) => continue,
        };
        return Err(ModelError::Tensor {
            path: path.to_path_buf(),
            name: stored(&name),
            reason: format!("{reason} (for `{name}`)"),
        });
    }
    Ok(())
}

/// The index entry of the tensor `name` of the GGUF file `path`.
///
/// # Errors
/// [`ModelError::Tensor`] when the file has no such tensor.
pub(crate) fn tensor_info<'a>(
    content: &'a Content,
    name: &str,
    path: &Path,
) -> Result<&'a TensorInfo> {
    content
        .tensor_infos
        .get(name)
        .ok_or_else(|| ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason: "missing from the file".into(),
        })
}

/// The tensor `name` (index entry `info`) from its stored bytes `raw`, on the CPU.
///
/// # Errors
/// [`ModelError::Tensor`] when the bytes do not hold the tensor.
pub(crate) fn qtensor_of(
    info: &TensorInfo,
    raw: &[u8],
    name: &str,
    path: &Path,
) -> Result<QTensor> {
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        info.ggml_dtype,
        raw,
        info.shape.dims().to_vec(),
        &Device::Cpu,
    )
    .map_err(|e| tensor_error(path, name, e))
}

/// The fingerprint of a GGUF tensor as stored: its GGML type and the XXH3 of its bytes.
pub(crate) fn stored_fingerprint(info: &TensorInfo, raw: &[u8]) -> BaseFingerprint {
    BaseFingerprint::of_stored(
        info.shape.dims(),
        &format!("{:?}", info.ggml_dtype).to_lowercase(),
        xxhash_rust::xxh3::xxh3_64(raw),
    )
}

/// The stored bytes of the tensor `name` of the GGUF file `path`.
///
/// # Errors
/// [`ModelError::Tensor`] naming the tensor: missing, or beyond the end of the file.
pub(crate) fn read_raw(
    file: &mut File,
    content: &Content,
    name: &str,
    path: &Path,
) -> Result<Vec<u8>> {
    let info = tensor_info(content, name, path)?;
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size().max(1);
    let bytes = elems / block * info.ggml_dtype.type_size();
    let start = content.tensor_data_offset.saturating_add(info.offset);
    let mut raw = vec![0u8; bytes];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut raw))
        .map_err(|e| ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason: format!("cannot read {bytes} bytes at offset {start} (truncated file?): {e}"),
        })?;
    Ok(raw)
}

/// Gives every LoRA layer the fingerprint of its tensor in the file.
fn attach_fingerprints(
    model: &mut LlamaForCausalLM,
    fingerprints: &HashMap<String, BaseFingerprint>,
) -> Result<()> {
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |p, layer, _| {
        if let (Some(fp), Some(linear)) = (
            fingerprints.get(p.as_str()),
            layer.as_any_mut().downcast_mut::<LoraLinear>(),
        ) {
            linear.set_stored_fingerprint(fp.clone());
        }
        Ok(())
    })?;
    Ok(())
}
