//! Merging a PEFT adapter into a safetensors model with no model code: what `lora merge` runs.
//!
//! Each targeted tensor `<module>.weight` becomes `W + s * B A` (computed in f32, stored in `W`'s
//! dtype, transposed for `fan_in_fan_out` and for embedding tables, reshaped to the kernel for
//! convolutions, as PEFT's `get_delta_weight`), or for a DoRA adapter PEFT's
//! `(m / ||W + s B A||) * (W + s B A)` per output feature; every other tensor is copied byte for
//! byte. The base is
//! memory-mapped and the output is written tensor by tensor, so memory stays near the largest
//! tensor, not the model's size. Everything is validated before the first byte is written, and the
//! output appears only when complete (temporary files, then rename): a failed merge leaves no
//! output behind.
//!
//! ```no_run
//! use lora_runtime::merge_file::merge_safetensors;
//! let report = merge_safetensors("model.safetensors".as_ref(), "my-adapter".as_ref(),
//!                                "merged.safetensors".as_ref(), &mut |_done, _total| {})?;
//! println!("merged {} of {} tensors", report.merged, report.tensors);
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, View};

use crate::error::{Error, Result};
use crate::fingerprint::BaseFingerprint;
use crate::fs::{RealFs, Staging};
use crate::kernels::{add_low_rank, all_finite, dora_rescale};
use crate::layout::FactorNames;
use crate::peft::{candle_of, parse_safetensors, tensor_bytes, AdapterFile, Factors, LoadOptions};

/// The index file of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What a merge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors that received a LoRA delta.
    pub merged: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Output files written.
    pub files: usize,
}

/// One input file and where its merged copy goes.
struct Shard {
    input: PathBuf,
    output: PathBuf,
    map: Mmap,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only; a concurrent truncation of the input by another process
    // is outside what any reader of a file can defend against.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// `(input shard, output shard)` pairs and the index file to copy, if any.
type Plan = (Vec<(PathBuf, PathBuf)>, Option<PathBuf>);

/// The shards of `base` and their output paths under `out`.
fn plan(base: &Path, out: &Path) -> Result<Plan> {
    let meta = std::fs::metadata(base).map_err(|e| Error::io(base, e))?;
    if !meta.is_dir() {
        return Ok((vec![(base.to_path_buf(), out.to_path_buf())], None));
    }
    let index_path = base.join(INDEX_FILE);
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index_path.clone(),
            source,
        })?;
        let mut files: Vec<&String> = index.weight_map.values().collect();
        files.sort();
        files.dedup();
        let shards = files
            .into_iter()
            .map(|f| {
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(Error::InvalidConfig {
                        file: Some(index_path.clone()),
                        field: "weight_map".into(),
                        reason: format!("shard name `{f}` must be a plain file name"),
                    });
                }
                Ok((base.join(f), out.join(f)))
            })
            .collect::<Result<_>>()?;
        return Ok((shards, Some(index_path)));
    }
    let single = base.join("model.safetensors");
    if single.exists() {
        return Ok((vec![(single, out.join("model.safetensors"))], None));
    }
    Err(Error::InvalidPath {
        path: base.to_path_buf(),
        reason: format!("directory has neither {INDEX_FILE} nor model.safetensors"),
    })
}

/// The change a PEFT adapter makes to one base weight, ready to be added to that weight's values
/// in any storage: what [`merge_safetensors`] writes, and what the GGUF merge of `lora-models`
/// adds to dequantized weights.
///
/// Each targeted weight becomes `W + s * B A` (transposed for `fan_in_fan_out` and for embedding
/// tables), or for a DoRA adapter `(m / ||W + s B A||) * (W + s B A)` per output feature, all in
/// f32.
#[derive(Debug, Clone)]
pub struct WeightDelta {
    /// `s * B`, f32 `[out, r]` (a convolution's `B [out, r, 1...]` flattened).
    b: Tensor,
    /// `A`, f32 `[r, in]` (a convolution's `A [r, in, k...]` flattened to `[r, in * k...]`).
    a: Tensor,
    /// DoRA's magnitude, f32 `[out]`, for a DoRA adapter (linear layers only: refused on
    /// embeddings and convolutions when the adapter is read).
    magnitude: Option<Tensor>,
    /// Whether the weight stores `(B A)^T`: `fan_in_fan_out` linear layers and embeddings.
    transposed: bool,
}

impl WeightDelta {
    /// The delta of `module` (whose factors are `factors`) in `adapter`, checked against the base
    /// weight's `shape` (`base` names the base file in errors).
    ///
    /// # Errors
    /// [`Error::BadTensor`] when the factors do not fit a weight of `shape`; candle's errors.
    pub fn of_module(
        adapter: &AdapterFile,
        module: &str,
        factors: &Factors,
        shape: &[usize],
        base: &Path,
    ) -> Result<Self> {
        let fan_in_fan_out = adapter.config.fan_in_fan_out;
        check_fits(adapter, module, factors, shape, fan_in_fan_out, base)?;
        let scale = adapter.config.scaling_for(module);
        Ok(Self {
            b: factors
                .b
                .to_dtype(DType::F32)?
                .flatten_from(1)?
                .affine(scale, 0.0)?,
            // AdaLoRA: `B (A * E)`, each row of `A` times its singular value.
            a: match &factors.e {
                Some((_, e)) => factors
                    .a
                    .to_dtype(DType::F32)?
                    .broadcast_mul(&e.to_dtype(DType::F32)?)?,
                None => factors.a.to_dtype(DType::F32)?,
            }
            .flatten_from(1)?,
            magnitude: match &factors.magnitude {
                Some((_, m)) => Some(m.to_dtype(DType::F32)?),
                None => None,
            },
            transposed: stored_transposed(factors, fan_in_fan_out),
        })
    }

    /// Whether the weight stores the delta transposed (`[in, out]`): embedding tables and
    /// `fan_in_fan_out` linear layers.
    pub fn is_transposed(&self) -> bool {
        self.transposed
    }

    /// The delta with its output features reordered by `reorder`, which is applied to `s * B`
    /// (`[out, r]`) and to DoRA's magnitude (`[out]`) and must move whole rows, as a permutation
    /// of the weight's rows does (the q/k row order of llama.cpp's GGUF files).
    ///
    /// # Errors
    /// Whatever `reorder` returns; [`Error::InvalidConfig`] for a transposed delta, whose output
    /// features are columns.
    pub fn reorder_outputs(
        self,
        reorder: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Self> {
        if self.transposed {
            return Err(Error::InvalidConfig {
                file: None,
                field: "fan_in_fan_out".into(),
                reason: "the output features of a transposed weight cannot be reordered as rows"
                    .into(),
            });
        }
        Ok(Self {
            b: reorder(&self.b)?,
            magnitude: match &self.magnitude {
                Some(m) => Some(reorder(m)?),
                None => None,
            },
            ..self
        })
    }

    /// `w` (the f32 values of a weight of `cols` columns, row-major) with the delta added, in one
    /// pass on the CPU.
    ///
    /// # Errors
    /// [`Error::NonFinite`] naming `key` when a merged value is not finite; candle's errors for
    /// sizes that do not match.
    pub fn merge_f32(&self, key: &str, w: &[f32], cols: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; w.len()];
        if !self.merge_f32_into(w, cols, &mut out)? {
            return Err(Error::NonFinite {
                path: key.to_string(),
            });
        }
        Ok(out)
    }

    /// Writes `w + delta` into `out`; whether every value is finite.
    fn merge_f32_into(&self, w: &[f32], cols: usize, out: &mut [f32]) -> Result<bool> {
        let (l, rt) = if self.transposed {
            (self.a.t()?, self.b.t()?)
        } else {
            (self.b.clone(), self.a.clone())
        };
        let l = l.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let rt = rt.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let rank = self.a.dim(0)?;
        let finite = add_low_rank(w, &l, &rt, rank, cols, out)?;
        match &self.magnitude {
            Some(m) => {
                Ok(finite && dora_rescale(out, cols, &m.to_vec1::<f32>()?, self.transposed)?)
            }
            None => Ok(finite),
        }
    }

    /// The merged tensor's bytes. f32 weights take the one-pass CPU kernel (read `W` once, write
    /// the result once, finite check folded in); other dtypes the general candle path.
    fn merged_bytes(
        &self,
        file: &Path,
        key: &str,
        bytes: &[u8],
        dtype: DType,
        shape: &[usize],
    ) -> Result<Vec<u8>> {
        // A kernel `[out, in, k...]` is the matrix `[out, in * k...]` in memory.
        let cols: usize = shape.iter().skip(1).product();
        if let (DType::F32, 2.., true) = (dtype, shape.len(), cfg!(target_endian = "little")) {
            let copied: Vec<f32>;
            // The mapping is unaligned only after tensors of odd byte counts: then copy the row data.
            let w: &[f32] = match bytemuck::try_cast_slice(bytes) {
                Ok(w) => w,
                Err(_) => {
                    copied = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    &copied
                }
            };
            let mut out = vec![0u8; bytes.len()];
            let finite = match bytemuck::try_cast_slice_mut::<u8, f32>(&mut out) {
                Ok(out32) => self.merge_f32_into(w, cols, out32)?,
                Err(_) => {
                    let mut out32 = vec![0f32; w.len()];
                    let finite = self.merge_f32_into(w, cols, &mut out32)?;
                    out = out32.iter().flat_map(|v| v.to_le_bytes()).collect();
                    finite
                }
            };
            if !finite {
                return Err(Error::NonFinite {
                    path: key.to_string(),
                });
            }
            return Ok(out);
        }
        let t = self.apply(bytes, dtype, shape)?;
        if !all_finite(&t)? {
            return Err(Error::NonFinite {
                path: key.to_string(),
            });
        }
        Ok(tensor_bytes(&t, file, key)?.1)
    }

    fn apply(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> candle_core::Result<Tensor> {
        let w = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?;
        let d = self.b.matmul(&self.a)?;
        let d = if self.transposed { d.t()? } else { d };
        let d = d.reshape(shape)?;
        let Some(m) = &self.magnitude else {
            return if dtype == DType::F32 {
                w + d
            } else {
                (w.to_dtype(DType::F32)? + d)?.to_dtype(dtype)
            };
        };
        // DoRA: the norm of each output feature (a row of `[out, in]`, a column of `[in, out]`).
        let plain = (w.to_dtype(DType::F32)? + d)?;
        let axis = usize::from(!self.transposed);
        let g = (m / plain.sqr()?.sum(axis)?.sqrt()?)?.unsqueeze(axis)?;
        plain.broadcast_mul(&g)?.to_dtype(dtype)
    }
}

/// A tensor of the output: the input's bytes, or computed with its delta when written.
struct OutTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    source: &'a [u8],
    delta: Option<(&'a str, WeightDelta)>,
    ctx: &'a WriteCtx<'a>,
}

/// State shared by the tensors of one output file while it is written.
struct WriteCtx<'a> {
    error: RefCell<Option<Error>>,
    progress: RefCell<&'a mut dyn FnMut(u64, u64)>,
    done: Cell<u64>,
    total: u64,
    map: &'a Mmap,
    /// The input file, for error messages.
    input: &'a Path,
    /// The range of the mapping handed out last: released when the next tensor is asked for.
    last: Cell<Option<(usize, usize)>>,
}

impl WriteCtx<'_> {
    fn release_last(&self) {
        if let Some((offset, len)) = self.last.take() {
            // Dropping already written pages keeps the resident set near one tensor. Advice only:
            // a failure changes nothing.
            // SAFETY: the mapping is a read-only file mapping; dropped pages are re-read from the
            // file if touched again.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
    }
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data_len(&self) -> usize {
        self.source.len()
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let ctx = self.ctx;
        ctx.release_last();
        let offset = self.source.as_ptr() as usize - ctx.map.as_ptr() as usize;
        ctx.last.set(Some((offset, self.source.len())));
        ctx.done.set(ctx.done.get() + self.source.len() as u64);
        (ctx.progress.borrow_mut())(ctx.done.get(), ctx.total);
        let Some((key, delta)) = &self.delta else {
            return std::borrow::Cow::Borrowed(self.source);
        };
        let merged = candle_of(self.dtype)
            .ok_or_else(|| Error::bad_tensor(ctx.input, *key, "is not a float tensor"))
            .and_then(|dtype| delta.merged_bytes(ctx.input, key, self.source, dtype, &self.shape));
        match merged {
            Ok(bytes) if bytes.len() == self.source.len() => std::borrow::Cow::Owned(bytes),
            Ok(bytes) => {
                ctx.error.borrow_mut().get_or_insert(Error::bad_tensor(
                    ctx.input,
                    *key,
                    format!(
                        "merged to {} bytes instead of its {}",
                        bytes.len(),
                        self.source.len()
                    ),
                ));
                std::borrow::Cow::Owned(vec![0; self.source.len()])
            }
            Err(e) => {
                ctx.error.borrow_mut().get_or_insert(e);
                std::borrow::Cow::Owned(vec![0; self.source.len()])
            }
        }
    }
}

/// Merges the PEFT adapter at `adapter` into the safetensors model at `base`, writing `out`.
///
/// `base` is a `.safetensors` file (then `out` is a file), or a directory with
/// `model.safetensors.index.json` and its shards, or with `model.safetensors` (then `out` is a
/// directory with the same files; the index is copied). `progress(bytes_done, bytes_total)` is
/// called as tensors are written.
///
/// # Errors
/// Any error naming the file, tensor or field at fault: a broken or unsupported adapter, a module
/// with no `<module>.weight` in the base, a shape that does not fit, a non-finite result, or I/O.
/// On error no output file is left behind.
pub fn merge_safetensors(
    base: &Path,
    adapter: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport> {
    merge_safetensors_with(base, adapter, out, &LoadOptions::default(), progress)
}

/// [`merge_safetensors`] with options: by default the base-weight fingerprints an adapter saved
/// by this crate records are checked against the base tensors (PEFT's adapters have none), and
/// a mismatch is refused with [`Error::BaseMismatch`]; `options.verify_base = false` skips that.
///
/// # Errors
/// As [`merge_safetensors`], and [`Error::BaseMismatch`].
pub fn merge_safetensors_with(
    base: &Path,
    adapter: &Path,
    out: &Path,
    options: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MergeReport> {
    let adapter = AdapterFile::read(adapter)?;
    let (plan, index) = plan(base, out)?;
    let shards: Vec<Shard> = plan
        .into_iter()
        .map(|(input, output)| {
            Ok(Shard {
                map: map_file(&input)?,
                input,
                output,
            })
        })
        .collect::<Result<_>>()?;
    let parsed: Vec<_> = shards
        .iter()
        .map(|s| parse_safetensors(&s.map, &s.input))
        .collect::<Result<_>>()?;

    // Validate every adapter module against the base before writing anything.
    let mut location: HashMap<String, usize> = HashMap::new();
    for (i, st) in parsed.iter().enumerate() {
        for name in st.names() {
            location.insert(name.to_string(), i);
        }
    }
    let mut deltas: HashMap<String, (String, WeightDelta)> = HashMap::new();
    for (module, f) in &adapter.factors {
        let weight = format!("{module}.weight");
        let Some(&i) = location.get(&weight) else {
            return Err(Error::bad_tensor(
                &adapter.path,
                &f.a_key,
                format!("targets `{module}`, but the base model has no tensor `{weight}`"),
            ));
        };
        let view = parsed[i]
            .tensor(&weight)
            .map_err(|source| Error::SafeTensors {
                path: shards[i].input.clone(),
                source,
            })?;
        let delta = WeightDelta::of_module(&adapter, module, f, view.shape(), &shards[i].input)?;
        if candle_of(view.dtype()).is_none() {
            return Err(Error::bad_tensor(
                &shards[i].input,
                &weight,
                format!(
                    "dtype {:?} cannot be merged: only F32, F16, BF16 and F64 weights",
                    view.dtype()
                ),
            ));
        }
        if options.verify_base && adapter.base_fingerprints.contains_key(module) {
            // Safetensors stores little-endian bytes: the fingerprint is their XXH3.
            let found = BaseFingerprint {
                shape: view.shape().to_vec(),
                dtype: candle_of(view.dtype()).map_or("f32", |d| d.as_str()).into(),
                hash: xxhash_rust::xxh3::xxh3_64(view.data()),
            };
            adapter.check_base(module, &found)?;
        }
        deltas.insert(weight, (module.clone(), delta));
    }

    let created_dir = index.is_some() || base.is_dir();
    let made_dir = if created_dir && !out.exists() {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        true
    } else {
        false
    };
    let result = (|| -> Result<MergeReport> {
        // Every output file is staged and the group replaces its targets together (`fs`).
        let mut staging = Staging::new(&RealFs);
        let mut report = MergeReport::default();
        let total: u64 = parsed
            .iter()
            .map(|st| {
                st.tensors()
                    .iter()
                    .map(|(_, v)| v.data().len() as u64)
                    .sum::<u64>()
            })
            .sum();
        let mut done = 0u64;
        for (shard, st) in shards.iter().zip(&parsed) {
            let tmp = staging.path_for(&shard.output);
            let base_done = done;
            let progress = &mut *progress;
            let mut shard_progress = move |d: u64, _t: u64| progress(base_done + d, total);
            let ctx = WriteCtx {
                error: RefCell::new(None),
                progress: RefCell::new(&mut shard_progress),
                done: Cell::new(0),
                total,
                map: &shard.map,
                input: &shard.input,
                last: Cell::new(None),
            };
            let mut tensors = Vec::new();
            for (name, view) in st.tensors() {
                let delta = deltas.remove(&name);
                report.merged += usize::from(delta.is_some());
                tensors.push((name, view, delta));
            }
            let modules: Vec<Option<String>> = tensors
                .iter()
                .map(|(_, _, d)| d.as_ref().map(|(m, _)| m.clone()))
                .collect();
            let views: Vec<(String, OutTensor)> = tensors
                .into_iter()
                .zip(&modules)
                .map(|((name, view, delta), module)| {
                    let source = view.data();
                    let out = OutTensor {
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        source,
                        delta: delta.and_then(|(_, d)| module.as_deref().map(|m| (m, d))),
                        ctx: &ctx,
                    };
                    (name, out)
                })
                .collect();
            report.tensors += views.len();
            let metadata = st_metadata(&shard.map, &shard.input)?;
            safetensors::serialize_to_file(views, metadata, &tmp).map_err(
                |source| match source {
                    safetensors::SafeTensorError::IoError(e) => Error::io(&tmp, e),
                    source => Error::SafeTensors {
                        path: tmp.clone(),
                        source,
                    },
                },
            )?;
            ctx.release_last();
            if let Some(e) = ctx.error.borrow_mut().take() {
                return Err(e);
            }
            done += ctx.done.get();
            report.bytes += ctx.done.get();
            report.files += 1;
        }
        if let Some(index) = &index {
            let tmp = staging.path_for(&out.join(INDEX_FILE));
            std::fs::copy(index, &tmp).map_err(|e| Error::io(&tmp, e))?;
            report.files += 1;
        }
        staging.commit()?;
        Ok(report)
    })();
    if result.is_err() && made_dir {
        let _ = std::fs::remove_dir(out);
    }
    result
}

fn st_metadata(map: &[u8], path: &Path) -> Result<Option<HashMap<String, String>>> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(map).map_err(|source| Error::SafeTensors {
            path: path.to_path_buf(),
            source,
        })?;
    // Keep the input's metadata; loaders such as transformers expect `format: pt`.
    let mut metadata = meta.metadata().clone().unwrap_or_default();
    metadata
        .entry("format".to_string())
        .or_insert_with(|| "pt".to_string());
    Ok(Some(metadata))
}

/// Whether the base weight of these factors stores `(B A)^T`: an embedding table
/// (`[num_embeddings, dim]`, PEFT's `transpose(B @ A, True)`), or a linear layer with
/// `fan_in_fan_out`; PEFT ignores `fan_in_fan_out` for convolutions.
fn stored_transposed(f: &Factors, fan_in_fan_out: bool) -> bool {
    match f.names() {
        FactorNames::Embedding => true,
        FactorNames::Lora | FactorNames::AdaLora => fan_in_fan_out && f.a.rank() == 2,
    }
}

fn check_fits(
    adapter: &AdapterFile,
    module: &str,
    f: &Factors,
    shape: &[usize],
    fan_in_fan_out: bool,
    base: &Path,
) -> Result<()> {
    let (r, inp) = (f.a.dims()[0], f.a.dims()[1]);
    let out = f.b.dims()[0];
    let kernel = &f.a.dims()[2..];
    let transposed = stored_transposed(f, fan_in_fan_out);
    let expected: Vec<usize> = if transposed {
        vec![inp, out]
    } else {
        [out, inp].iter().chain(kernel).copied().collect()
    };
    let (a_name, b_name) = (
        f.names().factor_name(crate::error::Factor::A),
        f.names().factor_name(crate::error::Factor::B),
    );
    if f.b.dims()[2..].iter().any(|&k| k != 1) {
        return Err(Error::bad_tensor(
            &adapter.path,
            &f.b_key,
            format!(
                "has shape {:?}: a convolution's {b_name} is a 1x1 kernel [{out}, {r}, 1...]",
                f.b.dims()
            ),
        ));
    }
    if shape != expected {
        let why = match (f.names(), transposed) {
            (FactorNames::Embedding, _) => " (an embedding table)",
            (FactorNames::Lora | FactorNames::AdaLora, true) => " (fan_in_fan_out)",
            (FactorNames::Lora | FactorNames::AdaLora, false) => "",
        };
        return Err(Error::bad_tensor(
            &adapter.path,
            &f.a_key,
            format!(
                "{a_name} {:?} and {b_name} {:?} need `{module}.weight` of shape {expected:?}{why}, but {} has {shape:?}",
                f.a.dims(),
                f.b.dims(),
                base.display()
            ),
        ));
    }
    Ok(())
}
