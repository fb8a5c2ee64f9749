//! Numerics of merging into low-precision weights.
//!
//! **The bound.** `merge()` computes `delta = (s B) A` in f32 (the factors of f16/bf16 layers are
//! f32, as PEFT keeps them), adds it to the weight widened to f32, and rounds the sum once to the
//! weight's dtype. Against the exact value `W + s B A` (computed here in f64) each merged
//! element therefore satisfies
//!
//! ```text
//! |merged - exact| <= 1/2 ulp_dtype(merged) + (r + 2) u32 (|W| + |s| sum_k |B_ik| |A_kj|)
//! ```
//!
//! with `u32 = 2^-24`: one rounding to the target dtype, plus the f32 error of an inner product
//! of length `r`, the scaling of `B` and the addition (Higham, ch. 3). For f16 and bf16 the
//! first term dominates: the merge is as exact as the dtype can store. Merging in the weight's
//! own precision (the trap PEFT_FORMAT.md warns about) breaks the bound, which the test shows.
//!
//! `unmerge()` restores the original weight bit for bit in every dtype: it keeps the original
//! tensor instead of subtracting the delta.

mod common;

use candle_core::{DType, Module, Tensor};
use common::tensor;
use lora::{LayerConfig, LoraLinear, LoraModelExt};

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F64];

/// Mantissa bits and minimum normal exponent of a float dtype.
fn format(dtype: DType) -> (i32, i32) {
    match dtype {
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
        DType::F32 => (23, -126),
        DType::F64 => (52, -1022),
        other => panic!("{other:?}"),
    }
}

/// The spacing of `dtype` values around `v`.
fn ulp(dtype: DType, v: f64) -> f64 {
    let (mantissa, emin) = format(dtype);
    let e = if v == 0.0 {
        emin
    } else {
        (v.abs().log2().floor() as i32).max(emin)
    };
    2f64.powi(e - mantissa)
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A layer with weight `[out, in]` in `dtype` and an adapter with random (non-zero) A and B.
fn layer(dtype: DType, seed: u64, out: usize, inp: usize, r: usize, alpha: f64) -> LoraLinear {
    let w = tensor(seed, &[out, inp], 1.0).to_dtype(dtype).unwrap();
    let mut l = LoraLinear::new(w, None);
    let ad = common::init(&mut l, LayerConfig::new(r, alpha), seed);
    assert_eq!(
        ad.a().dtype(),
        if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    );
    ad.a()
        .set(
            &tensor(seed + 1, &[r, inp], 0.7)
                .to_dtype(ad.a().dtype())
                .unwrap(),
        )
        .unwrap();
    ad.b()
        .set(
            &tensor(seed + 2, &[out, r], 0.7)
                .to_dtype(ad.b().dtype())
                .unwrap(),
        )
        .unwrap();
    l
}

/// `(exact, bound)` per element: the f64 value of `W + s B A` and the bound above.
fn reference(l: &LoraLinear, merged: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let ad = l.adapter().unwrap();
    let (w, a, b) = (f64s(l.base_weight().unwrap()), f64s(ad.a()), f64s(ad.b()));
    let (out, inp, r, s) = (l.out_features(), l.in_features(), ad.rank(), ad.scaling());
    let u32_ = f64::from(f32::EPSILON) / 2.0;
    let dtype = l.weight().unwrap().dtype();
    let mut exact = vec![0.0; out * inp];
    let mut bound = vec![0.0; out * inp];
    for i in 0..out {
        for j in 0..inp {
            let (mut d, mut mag) = (0.0, 0.0);
            for k in 0..r {
                d += b[i * r + k] * a[k * inp + j];
                mag += (b[i * r + k] * a[k * inp + j]).abs();
            }
            let e = i * inp + j;
            exact[e] = w[e] + s * d;
            bound[e] =
                0.5 * ulp(dtype, merged[e]) + (r + 2) as f64 * u32_ * (w[e].abs() + s.abs() * mag);
        }
    }
    (exact, bound)
}

#[test]
fn merged_weights_are_within_the_stated_bound_of_an_f64_reference_in_every_dtype() {
    for dtype in DTYPES {
        for (seed, out, inp, r, alpha) in [
            (1, 48, 64, 8, 16.0),
            (2, 17, 33, 3, 1.0),
            (3, 64, 16, 16, 64.0),
        ] {
            let mut l = layer(dtype, seed, out, inp, r, alpha);
            l.merge().unwrap();
            assert_eq!(l.weight().unwrap().dtype(), dtype);
            let merged = f64s(l.weight().unwrap());
            let (exact, bound) = reference(&l, &merged);
            let mut worst = 0.0f64;
            for e in 0..merged.len() {
                let err = (merged[e] - exact[e]).abs();
                assert!(
                    err <= bound[e],
                    "{dtype:?} seed {seed} element {e}: error {err} > bound {}",
                    bound[e]
                );
                worst = worst.max(err / bound[e]);
            }
            // The bound is not vacuous: for f16/bf16 the rounding uses a good part of it.
            if matches!(dtype, DType::F16 | DType::BF16) {
                assert!(
                    worst > 0.25,
                    "{dtype:?}: worst error is only {worst} of the bound"
                );
            }
        }
    }
}

#[test]
fn a_merge_in_the_weights_own_precision_would_break_the_bound() {
    for dtype in [DType::F16, DType::BF16] {
        let mut l = layer(dtype, 1, 48, 64, 8, 16.0);
        let ad = l.adapter().unwrap().clone();
        // The naive merge: factors cast to the weight's dtype, product and sum in that dtype.
        let (a, b) = (
            ad.a().to_dtype(dtype).unwrap(),
            ad.b().to_dtype(dtype).unwrap(),
        );
        let naive = (l.weight().unwrap()
            + b.matmul(&a).unwrap().affine(ad.scaling(), 0.0).unwrap())
        .unwrap();
        l.merge().unwrap();
        let naive = f64s(&naive);
        let (exact, bound) = reference(&l, &naive);
        let violations = (0..naive.len())
            .filter(|&e| (naive[e] - exact[e]).abs() > bound[e])
            .count();
        assert!(
            violations > 0,
            "{dtype:?}: the low-precision merge happened to stay within the bound"
        );
    }
}

#[test]
fn merge_then_unmerge_restores_the_weight_bit_for_bit_in_every_dtype() {
    for dtype in DTYPES {
        for fan_in_fan_out in [false, true] {
            let w = tensor(7, &[12, 9], 3.0).to_dtype(dtype).unwrap();
            let mut l = if fan_in_fan_out {
                LoraLinear::from_conv1d(w.t().unwrap().contiguous().unwrap(), None).unwrap()
            } else {
                LoraLinear::new(w, None)
            };
            let ad = common::init(&mut l, LayerConfig::new(4, 8.0), 3);
            ad.b()
                .set(&tensor(8, &[12, 4], 1.0).to_dtype(ad.b().dtype()).unwrap())
                .unwrap();
            let before: Vec<u64> = f64s(l.weight().unwrap())
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let x = tensor(9, &[3, 9], 1.0).to_dtype(dtype).unwrap();
            let y0: Vec<u64> = f64s(&l.forward(&x).unwrap())
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let mut model = vec![l];
            for round in 0..3 {
                model.merge().unwrap();
                let merged: Vec<u64> = f64s(model[0].weight().unwrap())
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_ne!(merged, before, "{dtype:?}: the merge changed nothing");
                model.unmerge().unwrap();
                let after: Vec<u64> = f64s(model[0].weight().unwrap())
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_eq!(
                    after, before,
                    "{dtype:?} fan_in_fan_out={fan_in_fan_out} round {round}"
                );
                let y: Vec<u64> = f64s(&model[0].forward(&x).unwrap())
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_eq!(y, y0, "{dtype:?}: the unmerged forward changed");
            }
        }
    }
}
