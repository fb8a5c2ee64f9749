//! `lora export --format gguf`: a PEFT adapter as llama.cpp's LoRA adapter GGUF, the layout of
//! llama.cpp's `convert_lora_to_gguf.py`: tensors `<GGUF tensor>.lora_a` (`[r, in]`) and
//! `.lora_b` (`[out, r]`, rows permuted like the weight for `attn_q` / `attn_k`), metadata
//! `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`.
//!
//! That format has one alpha per file and llama.cpp scales each tensor pair by `alpha / r`, `r`
//! read from `B`'s shape. A PEFT adapter's scaling can differ per module (`alpha_pattern`,
//! `rank_pattern`, rsLoRA's `alpha / sqrt(r)`): each module's own scaling `s` is written as the
//! alpha `s * r` it would need, the most common of these becomes the file's alpha, and every
//! other module's `B` is multiplied by `s * r / alpha`, so llama.cpp applies exactly PEFT's
//! scaling everywhere.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use lora_runtime::layout::FactorNames;
use lora_runtime::peft::AdapterFile;

use super::file::{
    put_kv_f32, put_kv_string, read_raw_header, write_data, write_header, TensorEntry,
    DEFAULT_ALIGNMENT,
};
use super::merge::weight_name;
use crate::error::{ModelError, Result};
use crate::llama::{open_gguf, permute, tensor_error, GgufArch};

/// The type the factors are written in (`--outtype`, as `convert_lora_to_gguf.py`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportType {
    /// f32 (the default: the factors as trained).
    #[default]
    F32,
    /// f16.
    F16,
    /// bf16.
    BF16,
    /// q8_0 for factors whose rows are multiples of 32, f16 for the others (as llama.cpp's
    /// converter falls back).
    Q8_0,
}

impl FromStr for ExportType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportType::F32,
            "f16" => ExportType::F16,
            "bf16" => ExportType::BF16,
            "q8_0" => ExportType::Q8_0,
            _ => {
                return Err(format!(
                    "unsupported output type `{s}`: expected one of f32, f16, bf16, q8_0"
                ))
            }
        })
    }
}

impl ExportType {
    /// The GGML type of a factor whose rows hold `row_len` values.
    fn for_row(self, row_len: usize) -> GgmlDType {
        match self {
            ExportType::F32 => GgmlDType::F32,
            ExportType::F16 => GgmlDType::F16,
            ExportType::BF16 => GgmlDType::BF16,
            ExportType::Q8_0 if row_len.is_multiple_of(32) => GgmlDType::Q8_0,
            ExportType::Q8_0 => GgmlDType::F16,
        }
    }
}

/// Options of [`export_lora_gguf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportOptions {
    /// The type the factors are written in.
    pub outtype: ExportType,
}

/// What [`export_lora_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExportReport {
    /// Tensor pairs (adapted modules) written.
    pub modules: usize,
    /// The file's `adapter.lora.alpha`.
    pub alpha: f32,
    /// The modules whose `B` carries a folded factor `s * r / alpha` (≠ 1), with that factor.
    pub folded: Vec<(String, f64)>,
    /// Factor tensors written in f16 because their rows do not fit q8_0's blocks of 32.
    pub fallbacks: Vec<String>,
}

/// Writes the PEFT adapter at `adapter` as llama.cpp's LoRA adapter GGUF `out`, for the GGUF
/// model `base` (its architecture, tensor names, shapes and head counts). See the module docs
/// for how per-module scalings are folded into one alpha.
///
/// # Errors
/// A [`ModelError`] naming the file and tensor or field at fault: a DoRA adapter (llama.cpp's
/// format has no magnitude), embedding or convolution factors, a module the base has no tensor
/// for or whose shapes do not fit, a non-Llama base, I/O. The output is written to a temporary
/// file and replaces `out` only when complete.
pub fn export_lora_gguf(
    adapter: &Path,
    base: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let adapter = AdapterFile::read(adapter)?;
    if adapter.config.use_dora {
        return Err(ModelError::Unsupported {
            path: adapter.path.clone(),
            field: "use_dora".into(),
            reason: "llama.cpp's LoRA adapter GGUF has no DoRA magnitude: merge the adapter \
                     into the model instead (`lora merge --base model.gguf`)"
                .into(),
        });
    }
    let (mut file, content) = open_gguf(base)?;
    let arch = GgufArch::of(base, &content)?;
    let listed = read_raw_header(&mut file, base)?.tensor_order;

    // Validate every module and compute the alpha each would need before writing anything.
    struct Pair {
        module: String,
        a: Tensor,
        b: Tensor,
        needed_alpha: f64,
    }
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    for (module, f) in &adapter.factors {
        if f.names() == FactorNames::Embedding || f.a.rank() != 2 {
            return Err(ModelError::Tensor {
                path: adapter.path.clone(),
                name: f.a_key.clone(),
                reason: format!(
                    "`{module}` is an embedding or convolution: only linear layers are exported \
                     to llama.cpp's adapter format"
                ),
            });
        }
        let name = weight_name(&adapter, module, &f.a_key, &content)?;
        let info = content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| ModelError::Tensor {
                path: base.to_path_buf(),
                name: name.clone(),
                reason: format!("missing from the file (the adapter targets `{module}`)"),
            })?;
        let (r, inp, outp) = (f.a.dim(0)?, f.a.dim(1)?, f.b.dim(0)?);
        if info.shape.dims() != [outp, inp] {
            return Err(ModelError::Tensor {
                path: adapter.path.clone(),
                name: f.a_key.clone(),
                reason: format!(
                    "lora_A [{r}, {inp}] and lora_B [{outp}, {r}] need `{name}` of shape \
                     [{outp}, {inp}], but {} has {:?}",
                    base.display(),
                    info.shape.dims()
                ),
            });
        }
        // AdaLoRA: `B (A * E)` is a plain low-rank pair with `A * E` as its `A`.
        let a = match &f.e {
            Some((_, e)) => {
                f.a.to_dtype(DType::F32)?
                    .broadcast_mul(&e.to_dtype(DType::F32)?)?
            }
            None => f.a.to_dtype(DType::F32)?,
        };
        let mut b = f.b.to_dtype(DType::F32)?;
        if let Some(heads) = arch.permuted_heads(&name) {
            b = permute(&b, heads).map_err(|e| tensor_error(&adapter.path, &f.b_key, e))?;
        }
        pairs.insert(
            name,
            Pair {
                module: module.clone(),
                a,
                b,
                needed_alpha: adapter.config.scaling_for(module) * r as f64,
            },
        );
    }

    // The most common needed alpha (ties: the first in file order) is the file's.
    let order: Vec<&String> = listed.iter().filter(|n| pairs.contains_key(*n)).collect();
    let mut counts: Vec<(f32, usize)> = Vec::new();
    for name in &order {
        let needed = pairs[*name].needed_alpha as f32;
        match counts.iter_mut().find(|(a, _)| *a == needed) {
            Some((_, n)) => *n += 1,
            None => counts.push((needed, 1)),
        }
    }
    let mut alpha = counts
        .iter()
        .fold(None::<(f32, usize)>, |best, &(a, n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((a, n)),
        })
        .map_or(1.0, |(a, _)| a);
    // llama.cpp reads an alpha of 0 as "no scaling" (scale 1): keep B (times 0) with alpha 1.
    if alpha == 0.0 || !alpha.is_finite() {
        alpha = 1.0;
    }

    let mut report = ExportReport {
        modules: order.len(),
        alpha,
        ..Default::default()
    };
    let mut entries = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    for name in &order {
        let pair = &pairs[*name];
        let factor = pair.needed_alpha / f64::from(alpha);
        let b = if factor == 1.0 {
            pair.b.clone()
        } else {
            report.folded.push((pair.module.clone(), factor));
            pair.b.affine(factor, 0.0)?
        };
        for (suffix, t) in [("lora_a", &pair.a), ("lora_b", &b)] {
            let tensor = format!("{name}.{suffix}");
            let row_len = t.dim(1)?;
            let dtype = options.outtype.for_row(row_len);
            if options.outtype == ExportType::Q8_0 && dtype != GgmlDType::Q8_0 {
                report.fallbacks.push(tensor.clone());
            }
            let q = QTensor::quantize(t, dtype).map_err(|e| tensor_error(out, &tensor, e))?;
            data.push(
                q.data()
                    .map_err(|e| tensor_error(out, &tensor, e))?
                    .into_owned(),
            );
            entries.push(TensorEntry {
                name: tensor,
                dims: t.dims().to_vec(),
                dtype,
            });
        }
    }

    let mut kv = Vec::new();
    put_kv_string(&mut kv, "general.architecture", &arch.name);
    put_kv_string(&mut kv, "general.type", "adapter");
    put_kv_string(&mut kv, "adapter.type", "lora");
    put_kv_f32(&mut kv, "adapter.lora.alpha", alpha);
    lora_runtime::write_atomically(out, |tmp| -> Result<()> {
        let f = File::create(tmp).map_err(|e| ModelError::io(tmp, e))?;
        let mut w = BufWriter::new(f);
        let io = |e| ModelError::io(tmp, e);
        write_header(&mut w, 4, &kv, &entries, DEFAULT_ALIGNMENT).map_err(io)?;
        for d in &data {
            write_data(&mut w, d, DEFAULT_ALIGNMENT).map_err(io)?;
        }
        w.flush().map_err(io)
    })?;
    Ok(report)
}
