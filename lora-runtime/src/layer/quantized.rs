//! [`QuantizedWeight`]: a frozen base weight kept as a GGUF-quantized tensor (candle's
//! [`QTensor`]: Q4_0 ... Q8_0, the K-quants), for LoRA over a quantized model (QLoRA).
//!
//! On the CPU the forward dequantizes the weight to f32 for each product and multiplies with
//! gemm: the dequantized model's result (up to the summation order), for one row or many.
//! candle's quantized matmul, which quantizes the input to 8 bits, was tried for decoding steps:
//! it turned SmolLM2's greedy answer to "What is the capital of France?" from "The capital of
//! France is Paris." into French gibberish (a near tie, 0.08 apart, flipped by the input's
//! rounding), and for Q4_1, Q5_0, Q5_1 it has no SIMD kernel (at 512 rows of 576 into 1536,
//! 143 ms for Q4_1 against 6 ms dequantized). In a graph that trains, the backward gives the
//! input's gradient through the weight dequantized again and no weight gradient: the base is
//! frozen. (On CUDA the forward is candle's quantized matmul, one row block at a time.)
//!
//! The dequantized weight is transient and never whole: a large weight is held as row blocks of
//! at most [`PART_ELEMS`] weights (an LM head of 128k x 4096 would otherwise need 2 GiB of f32
//! for each product), each dequantized for its share of the product and freed.
//!
//! ```
//! use candle_core::quantized::{GgmlDType, QTensor};
//! use candle_core::{Device, Tensor, Var};
//! use lora_runtime::{LoraLinear, QuantizedWeight};
//!
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1., (8, 64), &dev)?;
//! let q = QuantizedWeight::new(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
//! let layer = LoraLinear::from_quantized(q, None);
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 64), &dev)?)?;
//! let grads = layer.forward_t(x.as_tensor(), true)?.sum_all()?.backward()?;
//! assert_eq!(grads.get(x.as_tensor()).map(|g| g.dims().to_vec()), Some(vec![2, 64]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor, D};

use crate::error::LayerResult;
use crate::fingerprint::BaseFingerprint;
use crate::kernels;

/// The most weights in one row block of a [`QuantizedWeight`] (16 MiB once dequantized).
pub const PART_ELEMS: usize = 1 << 22;

/// A block of rows of a quantized weight.
#[derive(Debug)]
struct Part {
    rows: Range<usize>,
    tensor: QTensor,
}

/// A frozen weight `[out, in]` stored quantized (see the module docs).
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    /// Row blocks, in order, covering every row.
    parts: Arc<[Part]>,
    /// `(out, in)`.
    shape: (usize, usize),
    dtype: GgmlDType,
    device: Device,
}

impl QuantizedWeight {
    /// Takes a quantized matrix `[out, in]`, split into row blocks of at most [`PART_ELEMS`]
    /// weights when larger.
    ///
    /// # Errors
    /// When the tensor is not a matrix or its blocks cannot be read.
    pub fn new(tensor: QTensor) -> candle_core::Result<Self> {
        let (out, inp) = tensor.shape().dims2()?;
        let (dtype, device) = (tensor.dtype(), tensor.device());
        let per_part = (PART_ELEMS / inp.max(1)).max(1);
        let parts: Vec<Part> = if out <= per_part {
            vec![Part {
                rows: 0..out,
                tensor,
            }]
        } else {
            let data = tensor.data()?;
            let row_bytes = data.len() / out;
            (0..out)
                .step_by(per_part)
                .map(|first| {
                    let rows = first..(first + per_part).min(out);
                    let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
                    let storage = QStorage::from_data(Cow::Borrowed(bytes), &device, dtype)?;
                    let tensor = QTensor::new(storage, (rows.len(), inp))?;
                    Ok(Part { rows, tensor })
                })
                .collect::<candle_core::Result<_>>()?
        };
        Ok(Self {
            parts: parts.into(),
            shape: (out, inp),
            dtype,
            device,
        })
    }
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.shape
    }
    /// The GGML type of the stored blocks.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.dtype
    }
    /// The device the blocks live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The bytes the blocks take.
    pub fn storage_size_in_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.tensor.storage_size_in_bytes())
            .sum()
    }
    /// The weight in f32 on its device: a new tensor each call.
    ///
    /// # Errors
    /// A candle error.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        let parts = self
            .parts
            .iter()
            .map(|p| p.tensor.dequantize(&self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// The fingerprint of the blocks as held: their GGML type (lowercase, as GGUF loaders name
    /// it, e.g. `q4_1`) and the XXH3 of their bytes.
    ///
    /// # Errors
    /// When the blocks cannot be read.
    pub fn fingerprint(&self) -> LayerResult<BaseFingerprint> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for part in self.parts.iter() {
            hasher.update(&part.tensor.data()?);
        }
        Ok(BaseFingerprint::of_stored(
            &[self.shape.0, self.shape.1],
            &format!("{:?}", self.dtype).to_lowercase(),
            hasher.digest(),
        ))
    }

    /// The rows `ids` (any shape, integer ids) in f32: `[..ids, in]`, as an embedding table.
    ///
    /// # Errors
    /// An id out of range; a candle error.
    pub fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (out, inp) = self.shape;
        let flat: Vec<u32> = ids
            .flatten_all()?
            .to_dtype(candle_core::DType::U32)?
            .to_vec1()?;
        if let Some(bad) = flat.iter().find(|&&id| id as usize >= out) {
            candle_core::bail!("token id {bad} is out of range for an embedding of {out} rows");
        }
        let mut values = vec![0f32; flat.len() * inp];
        for part in self.parts.iter() {
            let (positions, local): (Vec<usize>, Vec<u32>) = flat
                .iter()
                .enumerate()
                .filter(|(_, &id)| part.rows.contains(&(id as usize)))
                .map(|(i, &id)| (i, id - part.rows.start as u32))
                .unzip();
            if local.is_empty() {
                continue;
            }
            let n = local.len();
            let local = Tensor::from_vec(local, n, &self.device)?;
            let rows = part
                .tensor
                .embedding(&local)?
                .to_dtype(candle_core::DType::F32)?;
            let rows: Vec<f32> = rows.flatten_all()?.to_vec1()?;
            for (k, &i) in positions.iter().enumerate() {
                values[i * inp..(i + 1) * inp].copy_from_slice(&rows[k * inp..(k + 1) * inp]);
            }
        }
        let mut dims = ids.dims().to_vec();
        dims.push(inp);
        Tensor::from_vec(values, dims, &self.device)
    }

    /// `x W^T` for `x [..., in]` (f32, f16 or bf16; made contiguous), differentiable in `x` when
    /// `x` tracks a gradient.
    ///
    /// # Errors
    /// A shape or dtype the quantized matmul does not take.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let apply = |parts: Range<usize>| {
            let op = QuantizedMatmul {
                weight: self.clone(),
                parts,
            };
            if x.track_op() {
                x.apply_op1(op)
            } else {
                x.apply_op1_no_bwd(&op)
            }
        };
        if matches!(self.device, Device::Cpu) || self.parts.len() == 1 {
            return apply(0..self.parts.len());
        }
        // Elsewhere candle's quantized kernel, one block at a time.
        let blocks = (0..self.parts.len())
            .map(|i| apply(i..i + 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&blocks, D::Minus1)
    }
}

/// The quantized matmul over the row blocks `parts` of a weight (their output columns), as a
/// custom op with a backward for the input only.
struct QuantizedMatmul {
    weight: QuantizedWeight,
    parts: Range<usize>,
}

impl QuantizedMatmul {
    /// The blocks, the first row they start at and the rows they cover.
    fn blocks(&self) -> (&[Part], usize, usize) {
        let blocks = self.weight.parts.get(self.parts.clone()).unwrap_or(&[]);
        let first = blocks.first().map_or(0, |p| p.rows.start);
        let rows = blocks.iter().map(|p| p.rows.len()).sum();
        (blocks, first, rows)
    }
}

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "lora-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = self.weight.shape.1;
        let (blocks, first, out) = self.blocks();
        let (CpuStorage::F32(x), Some((start, end)), Some(&last)) =
            (storage, layout.contiguous_offsets(), layout.dims().last())
        else {
            candle_core::bail!("quantized matmul: expected a contiguous f32 input");
        };
        if last != inp {
            candle_core::bail!(
                "quantized matmul: input {:?} for a weight {:?}",
                layout.dims(),
                self.weight.shape
            );
        }
        let (x, rows) = (&x[start..end], (end - start) / inp.max(1));
        let mut dst = vec![0f32; rows * out];
        for part in blocks {
            let dense = part.tensor.dequantize(&Device::Cpu)?;
            let (guard, _) = dense.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(values)) = &*guard else {
                candle_core::bail!("quantized matmul: the dequantized weight is not f32");
            };
            let w = kernels::MatRef::row_major(values, values.len() / inp.max(1), inp);
            kernels::matmul_t_into(&mut dst, out, part.rows.start - first, x, rows, w)?;
        }
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.blocks().0 {
            [part] => part.tensor.cuda_fwd(storage, layout),
            _ => candle_core::bail!("quantized matmul: one row block at a time on CUDA"),
        }
    }

    /// `dL/dx = dL/dy W` with `W` dequantized block by block for this product only; no
    /// gradient for `W`.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inp = self.weight.shape.1;
        let (blocks, first, out) = self.blocks();
        let rows = grad_res.elem_count() / out.max(1);
        let grad = grad_res
            .reshape((rows, out))?
            .to_dtype(candle_core::DType::F32)?;
        let mut total: Option<Tensor> = None;
        for part in blocks {
            let w = part.tensor.dequantize(grad.device())?;
            let g = grad
                .narrow(D::Minus1, part.rows.start - first, part.rows.len())?
                .matmul(&w)?;
            total = Some(match total {
                Some(t) => (t + g)?,
                None => g,
            });
        }
        let total = match total {
            Some(t) => t,
            None => Tensor::zeros((rows, inp), candle_core::DType::F32, grad.device())?,
        };
        let mut dims = arg.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inp;
        }
        Ok(Some(total.reshape(dims)?.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Module, Var};

    use super::*;
    use crate::adapter::DEFAULT_ADAPTER;
    use crate::config::{LayerConfig, LoraInit};
    use crate::error::LayerError;
    use crate::layer::{LoraLayer, LoraLinear};
    use crate::testing::max_diff;

    const TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// A random weight quantized, as candle's tensor (for `QMatMul`) and as ours, and its
    /// dequantized values.
    fn quantized(
        dtype: GgmlDType,
        out: usize,
        inp: usize,
    ) -> (Arc<QTensor>, QuantizedWeight, Tensor) {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let ours = QuantizedWeight::new(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        (q, ours, dense)
    }

    /// The layer over `q` and the same layer over its dequantized weight, with one adapter of
    /// random (non-zero) factors, the same in both.
    fn pair(q: &QuantizedWeight, dense: &Tensor, bias: &Tensor) -> (LoraLinear, LoraLinear) {
        let mut ql = LoraLinear::from_quantized(q.clone(), Some(bias.clone()));
        let mut dl = LoraLinear::new(dense.clone(), Some(bias.clone()));
        let config = LayerConfig {
            init: LoraInit::Gaussian,
            ..LayerConfig::new(4, 8.0)
        };
        let adapter = ql.fresh_adapter(&config, 3).unwrap();
        let (out, r) = adapter.b().as_tensor().dims2().unwrap();
        let b = Tensor::randn(0f32, 0.1, (out, r), &Device::Cpu).unwrap();
        adapter.b().set(&b).unwrap();
        let copy = |v: &Var| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap();
        let twin =
            crate::adapter::Adapter::new(copy(adapter.a()), copy(adapter.b()), 8.0, false, 0.0)
                .unwrap();
        ql.insert_adapter(DEFAULT_ADAPTER, adapter).unwrap();
        dl.insert_adapter(DEFAULT_ADAPTER, twin).unwrap();
        (ql, dl)
    }

    #[test]
    fn the_base_forward_is_the_dequantized_layers_for_every_type() {
        let few = Tensor::randn(0f32, 1.0, (1, 1, 256), &Device::Cpu).unwrap();
        let many = Tensor::randn(0f32, 1.0, (2, 8, 256), &Device::Cpu).unwrap();
        for dtype in TYPES {
            let (_, ours, dense) = quantized(dtype, 24, 256);
            let layer = LoraLinear::from_quantized(ours, None);
            // The dense product of the dequantized weight, up to the summation order: within
            // the bound of a length-256 f32 dot product, k eps sum |x w|.
            let bound = 256.0 * f32::EPSILON * 256.0 * max_abs(&many) * max_abs(&dense);
            let dense_layer = LoraLinear::new(dense.clone(), None);
            for x in [&few, &many] {
                let y = layer.forward(x).unwrap();
                let expected = dense_layer.forward(x).unwrap();
                assert!(max_diff(&y, &expected) <= bound, "{dtype:?}");
            }
        }
    }

    #[test]
    fn lora_term_and_gradients_match_the_dequantized_layer() {
        let bias = Tensor::randn(0f32, 1.0, 16, &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let (_, q, dense) = quantized(dtype, 16, 256);
            let (ql, dl) = pair(&q, &dense, &bias);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 256), &Device::Cpu).unwrap())
                .unwrap();
            // The LoRA term is added exactly: output minus the base's output.
            let y = ql.forward_t(x.as_tensor(), true).unwrap();
            let base = LoraLinear::from_quantized(q.clone(), Some(bias.clone()))
                .forward(x.as_tensor())
                .unwrap();
            let ad = dl.adapter().unwrap();
            let term = x
                .as_tensor()
                .matmul(&ad.a().as_tensor().t().unwrap())
                .unwrap()
                .matmul(&ad.b().as_tensor().t().unwrap())
                .unwrap()
                .affine(ad.scaling(), 0.0)
                .unwrap();
            let scale = max_abs(&term);
            assert!(
                max_diff(&(y.clone() - base).unwrap(), &term) <= 1e-5 * scale.max(1.0),
                "{dtype:?}"
            );
            // A fixed upstream gradient g: dL/dx = g W + ..., dL/dA, dL/dB as the dense layer's.
            let g = Tensor::randn(0f32, 1.0, (5, 16), &Device::Cpu).unwrap();
            let grads_q = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let y_d = dl.forward_t(x.as_tensor(), true).unwrap();
            let grads_d = (y_d * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (qa, da) = (ql.adapter().unwrap(), dl.adapter().unwrap());
            for (tq, td) in [
                (x.as_tensor(), x.as_tensor()),
                (qa.a().as_tensor(), da.a().as_tensor()),
                (qa.b().as_tensor(), da.b().as_tensor()),
            ] {
                let (gq, gd) = (grads_q.get(tq).unwrap(), grads_d.get(td).unwrap());
                assert!(max_diff(gq, gd) <= 1e-5 * max_abs(gd).max(1.0), "{dtype:?}");
            }
        }
    }

    #[test]
    fn merge_dora_and_decomposition_are_refused_inference_works() {
        let (_, q, dense) = quantized(GgmlDType::Q8_0, 8, 64);
        let bias = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let (mut ql, _) = pair(&q, &dense, &bias);
        assert!(matches!(ql.prepare_merge(), Err(LayerError::Quantized(_))));
        assert!(matches!(ql.weight(), Err(LayerError::Quantized(_))));
        assert!(!ql.supports_dora());
        let decomposed = LayerConfig {
            init: LoraInit::Olora,
            ..LayerConfig::new(2, 4.0)
        };
        assert!(matches!(
            ql.fresh_decomposed(&decomposed, 0),
            Err(LayerError::Quantized(_))
        ));
        assert!(!ql.is_merged());
        let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
        assert_eq!(ql.forward(&x).unwrap().dims(), [3, 8]);
        // The fingerprint is the blocks' (a loader sets the file's instead).
        assert_eq!(ql.base_fingerprint().unwrap(), q.fingerprint().unwrap());
        ql.set_training(true);
        assert_eq!(ql.adapter_dtype(), DType::F32);
    }

    #[test]
    fn a_weight_split_into_row_blocks_computes_as_a_whole() {
        // 3 blocks of 16384 rows (PART_ELEMS / 256), the last one short.
        let out = 2 * (PART_ELEMS / 256) + 40;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let (q, ours, dense) = quantized(dtype, out, 256);
            assert_eq!(ours.parts.len(), 3);
            assert_eq!(ours.storage_size_in_bytes(), q.storage_size_in_bytes());
            assert_eq!(max_diff(&ours.dequantize().unwrap(), &dense), 0.0);
            let whole = QuantizedWeight::new(QTensor::quantize(&dense, dtype).unwrap()).unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 256), &Device::Cpu).unwrap())
                .unwrap();
            for rows in [1, 9] {
                let xs = x.as_tensor().narrow(0, 0, rows).unwrap();
                let y = ours.forward(&xs).unwrap();
                let want = xs.matmul(&dense.t().unwrap()).unwrap();
                // Summation order: k eps sum |x w|.
                let bound = 256.0 * f32::EPSILON * 256.0 * max_abs(&xs) * max_abs(&dense);
                assert!(max_diff(&y, &want) <= bound, "{dtype:?} {rows}");
            }
            // The input gradient: g W.
            let g = Tensor::randn(0f32, 1.0, (9, out), &Device::Cpu).unwrap();
            let grads = (ours.forward(x.as_tensor()).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want = g.matmul(&dense).unwrap();
            let bound = out as f32 * f32::EPSILON * 5.0 * max_abs(&dense) * max_abs(&want).max(1.0);
            assert!(max_diff(grads.get(x.as_tensor()).unwrap(), &want) <= bound);
            // Rows of the table, across blocks.
            let ids = Tensor::new(&[[0u32, out as u32 - 1], [16384, 7]], &Device::Cpu).unwrap();
            let rows = ours.embedding(&ids).unwrap();
            assert_eq!(rows.dims(), [2, 2, 256]);
            let want = dense
                .index_select(&ids.flatten_all().unwrap(), 0)
                .unwrap()
                .reshape((2, 2, 256))
                .unwrap();
            assert_eq!(max_diff(&rows, &want), 0.0);
            assert!(ours
                .embedding(&Tensor::new(&[out as u32], &Device::Cpu).unwrap())
                .is_err());
            // The fingerprint is the whole tensor's bytes, however they are split.
            assert_eq!(ours.fingerprint().unwrap(), whole.fingerprint().unwrap());
        }
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }
}
