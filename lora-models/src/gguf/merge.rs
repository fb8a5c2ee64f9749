//! `lora merge` into a GGUF file: stream tensor by tensor, dequantize each adapted tensor, add
//! the f32 delta of the adapter (`lora_runtime::merge_file::WeightDelta`, DoRA included, rows
//! reordered as llama.cpp stores `attn_q` / `attn_k`), quantize it again, copy everything else
//! byte for byte with all metadata.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lora_runtime::merge_file::WeightDelta;
use lora_runtime::peft::AdapterFile;

use super::file::{
    data_size, read_raw_header, type_name, write_data, write_header, TensorEntry, DEFAULT_ALIGNMENT,
};
use crate::error::{ModelError, Result};
use crate::llama::{
    gguf_name, open_gguf, permute, qtensor_of, read_raw, stored_fingerprint, tensor_error,
    tensor_info, GgufArch,
};

/// The GGML type an adapted tensor is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetType {
    /// The tensor's own type (a K-quant falls back as in [`fallback_type`] only if its rows do
    /// not fit, which cannot happen for a tensor already stored in it).
    #[default]
    Same,
    /// This type, with llama.cpp's per-tensor fallback ([`fallback_type`]).
    To(GgmlDType),
}

/// The type names `--type` takes, llama.cpp's spelling.
const TYPE_NAMES: &str =
    "same, f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k";

impl FromStr for TargetType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = match s.to_ascii_lowercase().as_str() {
            "same" => return Ok(TargetType::Same),
            "f32" => GgmlDType::F32,
            "f16" => GgmlDType::F16,
            "bf16" => GgmlDType::BF16,
            "q8_0" => GgmlDType::Q8_0,
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            "q5_0" => GgmlDType::Q5_0,
            "q5_1" => GgmlDType::Q5_1,
            "q2_k" => GgmlDType::Q2K,
            "q3_k" => GgmlDType::Q3K,
            "q4_k" => GgmlDType::Q4K,
            "q5_k" => GgmlDType::Q5K,
            "q6_k" => GgmlDType::Q6K,
            _ => {
                return Err(format!(
                    "unsupported quantization type `{s}`: expected one of {TYPE_NAMES}"
                ))
            }
        };
        Ok(TargetType::To(t))
    }
}

/// The type llama.cpp's quantizer (`llama_tensor_get_type` in `llama-quant.cpp`) writes a tensor
/// with rows of `row_len` values in when `wanted` is asked for: K-quants need rows that are
/// multiples of 256 and otherwise fall back per tensor (`q4_k` -> `q5_0`, `q5_k` -> `q5_1`,
/// `q6_k` -> `q8_0`; `q2_k` / `q3_k` -> llama.cpp's `iq4_nl`, which candle cannot write, so its
/// 4-bit, 32-wide neighbour `q4_0`), and any type whose block does not divide the row falls back
/// to `f16`.
pub fn fallback_type(wanted: GgmlDType, row_len: usize) -> GgmlDType {
    let k_quant = matches!(
        wanted,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    );
    let t = if k_quant && !row_len.is_multiple_of(256) {
        match wanted {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => GgmlDType::Q4_0,
        }
    } else {
        wanted
    };
    if !row_len.is_multiple_of(t.block_size()) {
        GgmlDType::F16
    } else {
        t
    }
}

/// Options of [`merge_gguf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufMergeOptions {
    /// The type adapted tensors are written in (other tensors are copied as stored).
    pub target: TargetType,
    /// Check the base-weight fingerprints an adapter saved by this crate records (the stored
    /// GGML type and bytes) and refuse a different base.
    pub verify_base: bool,
}

impl Default for GgufMergeOptions {
    fn default() -> Self {
        Self {
            target: TargetType::Same,
            verify_base: true,
        }
    }
}

/// One adapted tensor of a GGUF merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedTensor {
    /// The GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// The adapter's module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// The type it was stored in.
    pub stored: GgmlDType,
    /// The type asked for (`--type`, or `stored` for `same`).
    pub requested: GgmlDType,
    /// The type written: `requested`, or its fallback when the rows do not fit it.
    pub written: GgmlDType,
    /// Values in the tensor.
    pub elems: usize,
    /// `max |q - w| / max |w|`, `w` the merged f32 values and `q` them quantized to `written`
    /// and dequantized again.
    pub max_rel_error: f64,
    /// `mean |q - w| / mean |w|`.
    pub mean_rel_error: f64,
    /// `sum |q - w|`.
    pub sum_abs_error: f64,
    /// `sum |w|`.
    pub sum_abs: f64,
    /// `sum (q - w)^2`: the squared Frobenius norm of the requantization error.
    pub sum_sq_error: f64,
}

impl MergedTensor {
    /// llama.cpp's name of the type written.
    pub fn written_name(&self) -> &'static str {
        type_name(self.written)
    }

    /// Whether the type written is a fallback for the one asked for.
    pub fn fell_back(&self) -> bool {
        self.written != self.requested
    }
}

/// What [`merge_gguf`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufMergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// The adapted tensors, in file order.
    pub merged: Vec<MergedTensor>,
    /// Bytes written.
    pub bytes: u64,
}

impl GgufMergeReport {
    /// The largest [`MergedTensor::max_rel_error`].
    pub fn max_rel_error(&self) -> f64 {
        self.merged
            .iter()
            .map(|t| t.max_rel_error)
            .fold(0.0, f64::max)
    }

    /// `sum |q - w| / sum |w|` over every adapted tensor.
    pub fn mean_rel_error(&self) -> f64 {
        let (e, w) = self
            .merged
            .iter()
            .fold((0.0, 0.0), |(e, w), t| (e + t.sum_abs_error, w + t.sum_abs));
        if w > 0.0 {
            e / w
        } else {
            0.0
        }
    }
}

/// An adapted tensor's plan.
struct Planned {
    module: String,
    delta: WeightDelta,
    requested: GgmlDType,
    written: GgmlDType,
}

/// Merges the PEFT adapter at `adapter` into the GGUF model `base` (architecture `llama` or
/// `qwen2`), writing `out`: each adapted tensor is dequantized, gets the adapter's delta in f32
/// (DoRA included; rows reordered as llama.cpp stores `attn_q` / `attn_k`) and is quantized to
/// `options.target` with llama.cpp's fallback ([`fallback_type`]); every other tensor and all
/// metadata are copied byte for byte, in the file's order. Memory stays near the largest tensor.
/// `progress(bytes_done, bytes_total)` is called as tensors are written.
///
/// # Errors
/// A [`ModelError`] naming the file and tensor or field at fault: an unreadable, truncated or
/// non-Llama GGUF, an adapter module with no GGUF tensor or whose shapes do not fit, a tied
/// `lm_head`, `fan_in_fan_out`, a fingerprint mismatch, a non-finite result, I/O. Everything is
/// checked before the first byte is written, and the output is written to a temporary file that
/// replaces `out` only when complete: a failed merge leaves no output behind.
pub fn merge_gguf(
    base: &Path,
    adapter: &Path,
    out: &Path,
    options: &GgufMergeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GgufMergeReport> {
    let adapter = AdapterFile::read(adapter)?;
    let (mut file, content) = open_gguf(base)?;
    let arch = GgufArch::of(base, &content)?;
    let header = read_raw_header(&mut file, base)?;
    check_extents(&file, &content, base)?;
    let alignment = alignment(&content);

    let mut plans: std::collections::HashMap<String, Planned> = Default::default();
    for (module, f) in &adapter.factors {
        let name = weight_name(&adapter, module, &f.a_key, &content)?;
        let Some(info) = content.tensor_infos.get(&name) else {
            return Err(ModelError::Tensor {
                path: base.to_path_buf(),
                name,
                reason: format!("missing from the file (the adapter targets `{module}`)"),
            });
        };
        let dims = info.shape.dims();
        let mut delta = WeightDelta::of_module(&adapter, module, f, dims, base)?;
        if let Some(heads) = arch.permuted_heads(&name) {
            delta = delta.reorder_outputs(|t| permute(t, heads))?;
        }
        if options.verify_base && adapter.base_fingerprints.contains_key(module) {
            let raw = read_raw(&mut file, &content, &name, base)?;
            adapter.check_base(module, &stored_fingerprint(info, &raw))?;
        }
        let requested = match options.target {
            TargetType::Same => info.ggml_dtype,
            TargetType::To(t) => t,
        };
        let row_len = dims.last().copied().unwrap_or(1);
        plans.insert(
            name,
            Planned {
                module: module.clone(),
                delta,
                requested,
                written: fallback_type(requested, row_len),
            },
        );
    }

    let entries: Vec<TensorEntry> = header
        .tensor_order
        .iter()
        .map(|name| {
            let info = tensor_info(&content, name, base)?;
            Ok(TensorEntry {
                name: name.clone(),
                dims: info.shape.dims().to_vec(),
                dtype: plans.get(name).map_or(info.ggml_dtype, |p| p.written),
            })
        })
        .collect::<Result<_>>()?;
    let total: u64 = entries.iter().map(TensorEntry::size).sum();

    let mut report = GgufMergeReport::default();
    lora_runtime::write_atomically(out, |tmp| -> Result<()> {
        let f = File::create(tmp).map_err(|e| ModelError::io(tmp, e))?;
        let mut w = BufWriter::new(f);
        let io = |e| ModelError::io(tmp, e);
        write_header(
            &mut w,
            header.kv_count,
            &header.kv_bytes,
            &entries,
            alignment,
        )
        .map_err(io)?;
        let mut done = 0u64;
        for entry in &entries {
            let raw = read_raw(&mut file, &content, &entry.name, base)?;
            let data = match plans.get(&entry.name) {
                None => raw,
                Some(plan) => {
                    let (data, merged) = merge_one(base, &content, &entry.name, &raw, plan)?;
                    report.merged.push(merged);
                    data
                }
            };
            if data.len() as u64 != entry.size() {
                return Err(ModelError::Tensor {
                    path: base.to_path_buf(),
                    name: entry.name.clone(),
                    reason: format!("{} bytes written instead of {}", data.len(), entry.size()),
                });
            }
            write_data(&mut w, &data, alignment).map_err(io)?;
            done += data.len() as u64;
            progress(done, total);
        }
        w.flush().map_err(io)?;
        report.tensors = entries.len();
        report.bytes = done;
        Ok(())
    })?;
    Ok(report)
}

/// Dequantizes one tensor, adds its delta, quantizes it to the planned type: the bytes and the
/// requantization error.
fn merge_one(
    path: &Path,
    content: &Content,
    name: &str,
    raw: &[u8],
    plan: &Planned,
) -> Result<(Vec<u8>, MergedTensor)> {
    let err = |e: candle_core::Error| tensor_error(path, name, e);
    let info = tensor_info(content, name, path)?;
    let dims = info.shape.dims().to_vec();
    let cols = dims.iter().skip(1).product::<usize>().max(1);
    let w = qtensor_of(info, raw, name, path)?
        .dequantize(&Device::Cpu)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(err)?;
    let merged = plan.delta.merge_f32(name, &w, cols)?;
    let t = Tensor::from_vec(merged, dims.as_slice(), &Device::Cpu).map_err(err)?;
    let q = QTensor::quantize(&t, plan.written).map_err(err)?;
    let back = q
        .dequantize(&Device::Cpu)
        .and_then(|b| b.flatten_all()?.to_vec1::<f32>())
        .map_err(err)?;
    let merged = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    let (mut max_err, mut max_w, mut sum_err, mut sum_w, mut sum_sq) =
        (0f64, 0f64, 0f64, 0f64, 0f64);
    for (q, w) in back.iter().zip(&merged) {
        let (e, a) = (f64::from((q - w).abs()), f64::from(w.abs()));
        max_err = max_err.max(e);
        max_w = max_w.max(a);
        sum_err += e;
        sum_w += a;
        sum_sq += e * e;
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let data = q.data().map_err(err)?.into_owned();
    Ok((
        data,
        MergedTensor {
            name: name.to_string(),
            module: plan.module.clone(),
            stored: info.ggml_dtype,
            requested: plan.requested,
            written: plan.written,
            elems: merged.len(),
            max_rel_error: ratio(max_err, max_w),
            mean_rel_error: ratio(sum_err, sum_w),
            sum_abs_error: sum_err,
            sum_abs: sum_w,
            sum_sq_error: sum_sq,
        },
    ))
}

/// The GGUF tensor of the adapter module `module` (`key`: one of its factors, for errors).
pub(crate) fn weight_name(
    adapter: &AdapterFile,
    module: &str,
    key: &str,
    content: &Content,
) -> Result<String> {
    if adapter.config.fan_in_fan_out {
        return Err(ModelError::Unsupported {
            path: adapter.path.clone(),
            field: "fan_in_fan_out".into(),
            reason: "GGUF Llama weights are stored [out, in]: an adapter with `fan_in_fan_out` \
                     does not belong to this model"
                .into(),
        });
    }
    if module == "lm_head" && !content.tensor_infos.contains_key("output.weight") {
        return Err(ModelError::Tensor {
            path: adapter.path.clone(),
            name: key.to_string(),
            reason: "targets `lm_head`, which this GGUF ties to `token_embd.weight`: merging \
                     it would change the embeddings too"
                .into(),
        });
    }
    gguf_name(&format!("{module}.weight")).ok_or_else(|| ModelError::Tensor {
        path: adapter.path.clone(),
        name: key.to_string(),
        reason: format!(
            "targets `{module}`, which has no GGUF tensor (Llama-family modules: \
             `model.layers.N.self_attn.{{q,k,v,o}}_proj`, `model.layers.N.mlp.{{gate,up,down}}_proj`, \
             `model.embed_tokens`, `lm_head`)"
        ),
    })
}

/// `general.alignment`, or GGUF's default.
fn alignment(content: &Content) -> u64 {
    match content.metadata.get("general.alignment") {
        Some(Value::U32(v)) if *v > 0 => u64::from(*v),
        Some(Value::U64(v)) if *v > 0 => *v,
        _ => DEFAULT_ALIGNMENT,
    }
}

/// Checks that every tensor's data lies inside the file (a truncated download is refused before
/// anything is written).
fn check_extents(file: &File, content: &Content, path: &Path) -> Result<()> {
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    for (name, info) in infos {
        let elems = info.shape.elem_count();
        if !elems.is_multiple_of(info.ggml_dtype.block_size().max(1)) {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                reason: format!(
                    "{elems} values do not fill whole {} blocks",
                    type_name(info.ggml_dtype)
                ),
            });
        }
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(data_size(info.ggml_dtype, elems));
        if end > len {
            return Err(ModelError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                reason: format!(
                    "its data ends at byte {end}, but the file has {len} bytes (truncated file?)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_quants_fall_back_per_tensor_as_llama_cpp_does() {
        use GgmlDType::*;
        // SmolLM2: rows of 576 (q, k, v, o, gate, up) do not fit K-quants, rows of 1536 (down) do.
        for (wanted, fallback) in [
            (Q4K, Q5_0),
            (Q5K, Q5_1),
            (Q6K, Q8_0),
            (Q2K, Q4_0),
            (Q3K, Q4_0),
        ] {
            assert_eq!(fallback_type(wanted, 576), fallback, "{wanted:?}");
            assert_eq!(fallback_type(wanted, 1536), wanted, "{wanted:?}");
        }
        // A row that not even the fallback's block of 32 divides: f16, for any block type.
        assert_eq!(fallback_type(Q4K, 48), F16);
        assert_eq!(fallback_type(Q8_0, 48), F16);
        for t in [F32, F16, BF16] {
            assert_eq!(fallback_type(t, 7), t);
        }
    }

    #[test]
    fn type_names_are_llama_cpp_s() {
        assert_eq!("same".parse::<TargetType>(), Ok(TargetType::Same));
        assert_eq!(
            "Q4_K".parse::<TargetType>(),
            Ok(TargetType::To(GgmlDType::Q4K))
        );
        let err = "q8_k".parse::<TargetType>().unwrap_err();
        assert!(err.contains("`q8_k`") && err.contains("q6_k"), "{err}");
        for name in TYPE_NAMES.split(", ").skip(1) {
            let TargetType::To(t) = name.parse::<TargetType>().unwrap() else {
                panic!("{name}")
            };
            assert_eq!(type_name(t), name);
        }
    }
}
