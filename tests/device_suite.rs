//! The numeric suite, registered per device (candle's `test_device!` pattern): every check takes a
//! `&Device` and runs on the CPU, and on CUDA when built with `--features cuda`. Without a GPU the
//! CUDA variants say so on stderr and pass, so a GPU-less CI still compiles them.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarMap};
use common::{assert_within, bits, lora_bound, tensor};
use lora::prelude::*;

macro_rules! test_device {
    ($check:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $check(&Device::Cpu);
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            match Device::new_cuda(0) {
                Ok(dev) => $check(&dev),
                Err(e) => eprintln!("skipped {}: no CUDA device ({e})", stringify!($cuda)),
            }
        }
    };
}

fn on(dev: &Device, t: Tensor) -> Tensor {
    t.to_device(dev).unwrap()
}

/// A layer `[out, in]` with bias and an adapter whose B is not zero.
fn layer(dev: &Device, dtype: DType, out: usize, inp: usize, r: usize) -> LoraLinear {
    let w = on(dev, tensor(1, &[out, inp], 1.0))
        .to_dtype(dtype)
        .unwrap();
    let b = on(dev, tensor(2, &[out], 1.0)).to_dtype(dtype).unwrap();
    let mut l = LoraLinear::from(Linear::new(w, Some(b)));
    let ad = common::init(&mut l, LayerConfig::new(r, 2.0 * r as f64), 3);
    let dims = ad.b().dims().to_vec();
    ad.b()
        .set(
            &on(dev, tensor(4, &dims, 0.5))
                .to_dtype(ad.b().dtype())
                .unwrap(),
        )
        .unwrap();
    l
}

fn merged_forward_equals_unmerged(dev: &Device) {
    let mut l = layer(dev, DType::F32, 48, 40, 8);
    let x = on(dev, tensor(5, &[2, 7, 40], 1.0));
    let unmerged = l.forward(&x).unwrap();
    let ad = l.adapter().unwrap().clone();
    let bound = lora_bound(
        &x.reshape((14, 40))
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap(),
        &l.weight().unwrap().to_device(&Device::Cpu).unwrap(),
        l.bias()
            .map(|b| b.to_device(&Device::Cpu).unwrap())
            .as_ref(),
        &ad.a().as_tensor().to_device(&Device::Cpu).unwrap(),
        &ad.b().as_tensor().to_device(&Device::Cpu).unwrap(),
        ad.scaling(),
    )
    .reshape((2, 7, 48))
    .unwrap();
    let w0 = bits(l.weight().unwrap());
    l.merge().unwrap();
    assert_eq!(
        l.weight().unwrap().device().location(),
        dev.location(),
        "merge stays on the device"
    );
    let merged = l.forward(&x).unwrap();
    assert_within(
        &merged.to_device(&Device::Cpu).unwrap(),
        &unmerged.to_device(&Device::Cpu).unwrap(),
        &bound,
        "merged vs unmerged",
    );
    l.unmerge().unwrap();
    assert_eq!(
        bits(l.weight().unwrap()),
        w0,
        "unmerge restores W bit for bit"
    );
}
test_device!(
    merged_forward_equals_unmerged,
    merged_forward_equals_unmerged_cpu,
    merged_forward_equals_unmerged_cuda
);

fn half_merge_goes_through_f32(dev: &Device) {
    for dtype in [DType::BF16, DType::F16] {
        let mut l = layer(dev, dtype, 32, 24, 4);
        assert_eq!(
            l.adapter().unwrap().a().dtype(),
            DType::F32,
            "half layers keep f32 factors"
        );
        let w0 = l.weight().unwrap().clone();
        let reference = (w0.to_dtype(DType::F32).unwrap() + l.delta_weight().unwrap()).unwrap();
        l.merge().unwrap();
        assert_eq!(l.weight().unwrap().dtype(), dtype);
        // One rounding of the f32 sum to the half type: half an ulp, relative.
        let rel = if dtype == DType::F16 {
            2f64.powi(-11)
        } else {
            2f64.powi(-8)
        };
        let bound = reference.abs().unwrap().affine(rel, 1e-6).unwrap();
        assert_within(
            &l.weight()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap(),
            &reference.to_device(&Device::Cpu).unwrap(),
            &bound.to_device(&Device::Cpu).unwrap(),
            "half merge",
        );
        l.unmerge().unwrap();
        assert_eq!(bits(l.weight().unwrap()), bits(&w0));
    }
}
test_device!(
    half_merge_goes_through_f32,
    half_merge_goes_through_f32_cpu,
    half_merge_goes_through_f32_cuda
);

fn fresh_adapter_is_exact_no_op_and_only_adapters_train(dev: &Device) {
    let w = on(dev, tensor(1, &[16, 12], 1.0));
    let base = Linear::new(w, None);
    let x = on(dev, tensor(2, &[3, 12], 1.0));
    let expected = base.forward(&x).unwrap();
    let mut model = vec![LoraLinear::from(base)];
    model.init_adapter(&VarMap::new()).unwrap();
    assert_eq!(bits(&model[0].forward(&x).unwrap()), bits(&expected));
    model[0]
        .adapter()
        .unwrap()
        .b()
        .set(&on(dev, tensor(3, &[16, 8], 0.1)))
        .unwrap();
    let loss = model[0]
        .forward(&x)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(model[0].weight().unwrap()).is_none());
    for v in model.trainable_vars() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
}
test_device!(
    fresh_adapter_is_exact_no_op_and_only_adapters_train,
    fresh_adapter_is_exact_no_op_and_only_adapters_train_cpu,
    fresh_adapter_is_exact_no_op_and_only_adapters_train_cuda
);

fn save_load_round_trip_and_mixed_batches(dev: &Device) {
    let model = vec![layer(dev, DType::F32, 20, 20, 4)];
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    let mut fresh = vec![LoraLinear::new(
        model[0].weight().unwrap().clone(),
        model[0].bias().cloned(),
    )];
    fresh.load_adapter(dir.path()).unwrap();
    fresh
        .load_adapter_with(dir.path(), &LoadOptions::default().with_name("copy"))
        .unwrap();
    let x = on(dev, tensor(6, &[4, 20], 1.0));
    let y = model[0].forward(&x).unwrap();
    assert_eq!(bits(&fresh[0].forward(&x).unwrap()), bits(&y));
    let rows = [Some("default"), None, Some("copy"), None];
    let mixed = fresh[0].forward_with_adapters(&x, &rows).unwrap();
    let base = Linear::new(model[0].weight().unwrap().clone(), model[0].bias().cloned())
        .forward(&x)
        .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let want = if row.is_some() { &y } else { &base };
        let d = common::max_abs_diff(
            &mixed.narrow(0, i, 1).unwrap(),
            &want.narrow(0, i, 1).unwrap(),
        );
        assert!(d < 1e-5, "row {i}: {d}");
    }
}
test_device!(
    save_load_round_trip_and_mixed_batches,
    save_load_round_trip_and_mixed_batches_cpu,
    save_load_round_trip_and_mixed_batches_cuda
);

/// Embedding and convolution layers: the merged forward equals the unmerged one, the unmerge
/// restores the base bit for bit, and training gives `A` and `B` (and only them) gradients.
fn embedding_and_conv_layers_merge_unmerge_and_train(dev: &Device) {
    use candle_nn::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, Embedding};
    use lora::{Adapter, LoraLayer};

    /// Gives `layer` an adapter with non-zero `A` and `B`, then checks it on input `x`.
    fn check<L: LoraLayer + Module + LoraModelExt>(mut layer: L, x: &Tensor, what: &str) {
        let options = InitOptions::default()
            .with_config(LayerConfig::new(3, 6.0))
            .with_seed(7);
        layer.init_adapter_with(&VarMap::new(), &options).unwrap();
        let ad: Adapter = layer.adapter().unwrap().clone();
        let dev = x.device();
        for (i, var) in [ad.a(), ad.b()].into_iter().enumerate() {
            let values = on(dev, tensor(10 + i as u64, var.dims(), 0.5));
            var.set(&values).unwrap();
        }
        let unmerged = layer.forward(x).unwrap();
        let grads = unmerged
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [ad.a(), ad.b()] {
            let g = grads.get(var.as_tensor()).expect("a gradient for A and B");
            let finite = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                finite.is_finite() && finite > 0.0,
                "{what}: gradient {finite}"
            );
        }
        let before = layer.lora_layers()[0].1.base_fingerprint().unwrap();
        layer.merge().unwrap();
        let merged = layer.forward(x).unwrap();
        let d = common::max_abs_diff(&merged, &unmerged);
        let scale = unmerged
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-5 * scale.max(1.0), "{what}: merged vs unmerged {d}");
        layer.unmerge().unwrap();
        assert_eq!(bits(&layer.forward(x).unwrap()), bits(&unmerged), "{what}");
        assert_eq!(layer.lora_layers()[0].1.base_fingerprint().unwrap(), before);
    }

    let table = on(dev, tensor(1, &[30, 12], 1.0));
    let ids = Tensor::new(&[[3u32, 29, 0, 3], [7, 7, 12, 1]], dev).unwrap();
    check(
        LoraEmbedding::from(Embedding::new(table, 12)),
        &ids,
        "embedding",
    );

    let config = Conv1dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let w = on(dev, tensor(2, &[8, 5, 3], 0.5));
    let b = on(dev, tensor(3, &[8], 0.5));
    let x = on(dev, tensor(4, &[2, 5, 13], 1.0));
    check(
        LoraConv1d::from(Conv1d::new(w, Some(b), config)),
        &x,
        "conv1d",
    );

    let config = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let w = on(dev, tensor(5, &[6, 4, 3, 2], 0.5));
    let x = on(dev, tensor(6, &[2, 4, 7, 5], 1.0));
    check(LoraConv2d::from(Conv2d::new(w, None, config)), &x, "conv2d");
}
test_device!(
    embedding_and_conv_layers_merge_unmerge_and_train,
    embedding_and_conv_layers_merge_unmerge_and_train_cpu,
    embedding_and_conv_layers_merge_unmerge_and_train_cuda
);
