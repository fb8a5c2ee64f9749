//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod reference;
pub mod server;

use candle_core::{DType, Device, Tensor};

/// A deterministic pseudo-random f32 tensor (a simple LCG, so tests do not depend on candle's RNG).
pub fn tensor(seed: u64, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Elementwise forward-error bound of the f32 computations `x W^T + b + s (x A^T) B^T` and
/// `x (W + s B A)^T + b`: each output is a sum of `k <= in + r + 2` rounded terms (the products,
/// the bias, the LoRA branch), so each side is within `gamma_k * (|x| (|W| + s |B| |A|)^T + |b|)`
/// of the exact value (Higham, ch. 3), with `gamma_k = k u / (1 - k u)`, `u = 2^-24`. The two
/// sides are within twice that of each other.
pub fn lora_bound(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Tensor {
    let (inp, r) = (w.dim(1).unwrap(), a.dim(0).unwrap());
    let k = (inp + r + 3) as f64;
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = k * u / (1.0 - k * u);
    let abs_delta = b
        .abs()
        .unwrap()
        .matmul(&a.abs().unwrap())
        .unwrap()
        .affine(s.abs(), 0.0)
        .unwrap();
    let mag = (w.abs().unwrap() + abs_delta).unwrap();
    let mut total = x.abs().unwrap().matmul(&mag.t().unwrap()).unwrap();
    if let Some(bias) = bias {
        total = total.broadcast_add(&bias.abs().unwrap()).unwrap();
    }
    total.affine(2.0 * gamma, 1e-30).unwrap()
}

/// Asserts `|got - want| <= bound` elementwise.
pub fn assert_within(got: &Tensor, want: &Tensor, bound: &Tensor, what: &str) {
    let diff = (got - want).unwrap().abs().unwrap();
    let excess = (diff - bound)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(excess <= 0.0, "{what}: error exceeds the bound by {excess}");
}

/// Gives `layer` a fresh `default` adapter with `config` and `seed` (one layer is a model of its
/// own) and returns it; its factors share storage with the layer's.
pub fn init(layer: &mut lora::LoraLinear, config: lora::LayerConfig, seed: u64) -> lora::Adapter {
    use lora::LoraModelExt;
    let options = lora::InitOptions::default()
        .with_config(config)
        .with_seed(seed);
    layer
        .init_adapter_with(&candle_nn::VarMap::new(), &options)
        .unwrap();
    layer.adapter().unwrap().clone()
}

/// The linear layer behind a visited layer.
pub fn linear(layer: &dyn lora::LoraLayer) -> &lora::LoraLinear {
    layer.downcast_ref().expect("a LoraLinear")
}
