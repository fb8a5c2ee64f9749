//! [`QuantizedWeight`]: a frozen base weight kept as a GGUF-quantized tensor (candle's
//! [`QTensor`]: Q4_0 ... Q8_0, the K-quants), for LoRA over a quantized model (QLoRA).
//!
//! The forward for a few rows (a decoding step) is candle's quantized matmul, which reads the
//! blocks as they are and quantizes the input to 8 bits (for the types it has SIMD kernels
//! for). For more rows (a prompt, a training
//! batch) the weight is dequantized to f32 for that one product and multiplied with gemm: the
//! dequantized model's result (up to the summation order), and much faster (candle's quantized matmul
//! is a matrix-vector kernel: at 512 rows of 576 into 1536, 143 ms for Q4_1 against 6 ms). In a
//! graph that trains, the backward gives the input's gradient through the weight dequantized
//! again and no weight gradient: the base is frozen. The dequantized weight is transient, freed
//! after its product: it never stays in memory.
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::quantized::{GgmlDType, QTensor};
//! use candle_core::{Device, Tensor, Var};
//! use lora_runtime::{LoraLinear, QuantizedWeight};
//!
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1., (8, 64), &dev)?;
//! let q = QuantizedWeight::new(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?))?;
//! let layer = LoraLinear::from_quantized(q, None);
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 64), &dev)?)?;
//! let grads = layer.forward_t(x.as_tensor(), true)?.sum_all()?.backward()?;
//! assert_eq!(grads.get(x.as_tensor()).map(|g| g.dims().to_vec()), Some(vec![2, 64]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};

use crate::kernels;

/// From this many input rows on, the CPU forward dequantizes and runs gemm.
pub(crate) const DENSE_ROWS: usize = 8;

/// The fewest input rows for which the CPU forward dequantizes and runs gemm: [`DENSE_ROWS`],
/// or 1 for the types whose quantized matmul candle has no SIMD kernel for (Q4_1, Q5_0, Q5_1:
/// 0.3 ms for one row of 576 into 1536 against 0.05 ms for Q8_0, slower than dequantizing) and
/// for float blocks.
fn dense_from(dtype: GgmlDType) -> usize {
    match dtype {
        GgmlDType::Q4_1
        | GgmlDType::Q5_0
        | GgmlDType::Q5_1
        | GgmlDType::F32
        | GgmlDType::F16
        | GgmlDType::BF16 => 1,
        _ => DENSE_ROWS,
    }
}

/// A frozen weight `[out, in]` stored quantized (see the module docs).
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    tensor: Arc<QTensor>,
    /// `(out, in)`.
    shape: (usize, usize),
    device: Device,
}

impl QuantizedWeight {
    /// Wraps a quantized matrix `[out, in]`.
    ///
    /// # Errors
    /// When the tensor is not a matrix.
    pub fn new(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        let shape = tensor.shape().dims2()?;
        let device = tensor.device();
        Ok(Self {
            tensor,
            shape,
            device,
        })
    }
    /// The quantized tensor.
    pub fn tensor(&self) -> &Arc<QTensor> {
        &self.tensor
    }
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.shape
    }
    /// The GGML type of the stored blocks.
    pub fn ggml_dtype(&self) -> GgmlDType {
        self.tensor.dtype()
    }
    /// The device the blocks live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The weight in f32 on its device: a new tensor each call.
    ///
    /// # Errors
    /// A candle error.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        self.tensor.dequantize(&self.device)
    }

    /// `x W^T` for `x [..., in]` (f32, f16 or bf16; made contiguous), differentiable in `x` when
    /// `x` tracks a gradient.
    ///
    /// # Errors
    /// A shape or dtype the quantized matmul does not take.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let op = QuantizedMatmul(self.tensor.clone());
        if x.track_op() {
            x.apply_op1(op)
        } else {
            x.apply_op1_no_bwd(&op)
        }
    }
}

/// The quantized matmul as a custom op with a backward for the input only.
struct QuantizedMatmul(Arc<QTensor>);

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "lora-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = self.0.shape().dims2()?;
        let rows = layout.shape().elem_count() / inp.max(1);
        let (CpuStorage::F32(x), Some((start, end)), true) = (
            storage,
            layout.contiguous_offsets(),
            rows >= dense_from(self.0.dtype()) && layout.dims().last() == Some(&inp),
        ) else {
            return self.0.as_ref().cpu_fwd(storage, layout);
        };
        let w = self.0.dequantize(&Device::Cpu)?;
        let (guard, w_layout) = w.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(w_values)) = &*guard else {
            return Err(candle_core::Error::msg(
                "quantized matmul: the dequantized weight is not f32 on the CPU",
            ));
        };
        let mut dst = vec![0f32; rows * out];
        kernels::base_matmul(&mut dst, &x[start..end], rows, inp, w_values, w_layout)?;
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
        self.0.as_ref().cuda_fwd(storage, layout)
    }

    /// `dL/dx = dL/dy W` with `W` dequantized for this product only; no gradient for `W`.
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = self.0.dequantize(&grad_res.device().clone())?;
        let (out, inp) = w.dims2()?;
        let rows = grad_res.elem_count() / out.max(1);
        let grad = grad_res
            .reshape((rows, out))?
            .to_dtype(w.dtype())?
            .matmul(&w)?;
        let mut dims = arg.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = inp;
        }
        Ok(Some(grad.reshape(dims)?.to_dtype(arg.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{DType, Module, Var};

    use super::*;
    use crate::adapter::DEFAULT_ADAPTER;
    use crate::config::{LayerConfig, LoraInit};
    use crate::error::LayerError;
    use crate::fingerprint::BaseFingerprint;
    use crate::layer::{LoraLayer, LoraLinear};

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

    fn quantized(dtype: GgmlDType, out: usize, inp: usize) -> (Arc<QTensor>, Tensor) {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let dense = q.dequantize(&Device::Cpu).unwrap();
        (q, dense)
    }

    /// The layer over `q` and the same layer over its dequantized weight, with one adapter of
    /// random (non-zero) factors, the same in both.
    fn pair(q: &Arc<QTensor>, dense: &Tensor, bias: &Tensor) -> (LoraLinear, LoraLinear) {
        let weight = QuantizedWeight::new(q.clone()).unwrap();
        let mut ql = LoraLinear::from_quantized(weight, Some(bias.clone()));
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

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn base_forward_few_rows_is_candles_quantized_matmul_many_the_dequantized_layer() {
        let few = Tensor::randn(0f32, 1.0, (1, DENSE_ROWS - 1, 256), &Device::Cpu).unwrap();
        let many = Tensor::randn(0f32, 1.0, (2, DENSE_ROWS, 256), &Device::Cpu).unwrap();
        for dtype in TYPES {
            let (q, dense) = quantized(dtype, 24, 256);
            let layer = LoraLinear::from_quantized(QuantizedWeight::new(q.clone()).unwrap(), None);
            // The dense product of the dequantized weight, up to the summation order: within
            // the bound of a length-256 f32 dot product, k eps sum |x w|.
            let amax =
                |t: &Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
            let bound = 256.0 * f32::EPSILON * 256.0 * amax(&many) * amax(&dense);
            let dense_layer = LoraLinear::new(dense.clone(), None);
            for x in [&few, &many] {
                let y = layer.forward(x).unwrap();
                if x.dim(1).unwrap() < dense_from(dtype) {
                    let expected = QMatMul::from_arc(q.clone()).unwrap().forward(x).unwrap();
                    assert_eq!(max_diff(&y, &expected), 0.0, "{dtype:?}");
                } else {
                    let expected = dense_layer.forward(x).unwrap();
                    assert!(max_diff(&y, &expected) <= bound, "{dtype:?}");
                }
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
            let (q, dense) = quantized(dtype, 16, 256);
            let (ql, dl) = pair(&q, &dense, &bias);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 256), &Device::Cpu).unwrap())
                .unwrap();
            // The LoRA term is added exactly: output minus the base's output.
            let y = ql.forward_t(x.as_tensor(), true).unwrap();
            let base = LoraLinear::from_quantized(
                QuantizedWeight::new(q.clone()).unwrap(),
                Some(bias.clone()),
            )
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
            let scale = term
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
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
                let scale = gd
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(max_diff(gq, gd) <= 1e-5 * scale.max(1.0), "{dtype:?}");
            }
        }
    }

    #[test]
    fn merge_dora_and_decomposition_are_refused_inference_works() {
        let (q, dense) = quantized(GgmlDType::Q8_0, 8, 64);
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
        assert_eq!(
            ql.base_fingerprint().unwrap(),
            BaseFingerprint::of_quantized(&q).unwrap()
        );
        ql.set_training(true);
        assert_eq!(ql.adapter_dtype(), DType::F32);
    }
}
