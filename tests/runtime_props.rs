//! Property tests of the runtime over random shapes and ranks: merged and unmerged forwards
//! agree within the f32 error bound, unmerge restores W bit for bit, a fresh adapter is an exact
//! no-op, and save then load round-trips bit-exactly.

mod common;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarMap};
use common::{assert_within, bits, lora_bound, tensor};
use lora::{LayerConfig, LoraInit, LoraLinear, LoraModelExt};
use proptest::prelude::*;

/// What a random test layer looks like.
struct Spec {
    seed: u64,
    inp: usize,
    out: usize,
    r: usize,
    alpha: f64,
    rslora: bool,
    bias: bool,
    fan_in_fan_out: bool,
}

/// A layer with a random weight (and maybe bias) and an adapter whose B is random, not zero.
fn random_layer(spec: &Spec) -> LoraLinear {
    let Spec {
        seed,
        inp,
        out,
        r,
        alpha,
        rslora,
        bias,
        fan_in_fan_out,
    } = *spec;
    let w = tensor(seed, &[out, inp], 1.0);
    let b = bias.then(|| tensor(seed + 1, &[out], 1.0));
    let mut l = if fan_in_fan_out {
        LoraLinear::from_conv1d(w.t().unwrap().contiguous().unwrap(), b).unwrap()
    } else {
        LoraLinear::from(Linear::new(w, b))
    };
    let cfg = LayerConfig::new(r, alpha).with_rslora(rslora);
    let ad = common::init(&mut l, cfg, seed);
    ad.b().set(&tensor(seed + 2, &[out, r], 0.5)).unwrap();
    l
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn merged_forward_equals_unmerged(
        seed in 0u64..1000, inp in 1usize..48, out in 1usize..48, r in 1usize..9,
        alpha in 0.5f64..64.0, rslora: bool, bias: bool, fan_in_fan_out: bool, batch in 1usize..4, seq in 1usize..5,
    ) {
        let mut l = random_layer(&Spec { seed, inp, out, r, alpha, rslora, bias, fan_in_fan_out });
        let x = tensor(seed + 3, &[batch, seq, inp], 1.0);
        let unmerged = l.forward(&x).unwrap();
        let w0 = bits(l.weight().unwrap());
        let ad = l.adapter().unwrap().clone();
        let w_out_in = if fan_in_fan_out { l.weight().unwrap().t().unwrap() } else { l.weight().unwrap().clone() };
        let bound = lora_bound(&x.reshape((batch * seq, inp)).unwrap(), &w_out_in, l.bias(), ad.a(), ad.b(), ad.scaling())
            .reshape((batch, seq, out)).unwrap();
        l.merge().unwrap();
        let merged = l.forward(&x).unwrap();
        assert_within(&merged, &unmerged, &bound, "merged vs unmerged");
        l.unmerge().unwrap();
        prop_assert_eq!(bits(l.weight().unwrap()), w0);
        prop_assert_eq!(bits(&l.forward(&x).unwrap()), bits(&unmerged));
    }

    #[test]
    fn fresh_adapter_is_an_exact_no_op(seed in 0u64..1000, inp in 1usize..48, out in 1usize..48, r in 1usize..9, gaussian: bool, bias: bool) {
        let w = tensor(seed, &[out, inp], 1.0);
        let b = bias.then(|| tensor(seed + 1, &[out], 1.0));
        let base = Linear::new(w, b);
        let x = tensor(seed + 2, &[3, inp], 1.0);
        let expected = base.forward(&x).unwrap();
        let mut l = LoraLinear::from(base);
        prop_assert_eq!(bits(&l.forward(&x).unwrap()), bits(&expected));
        let init = if gaussian { LoraInit::Gaussian } else { LoraInit::Kaiming };
        common::init(&mut l, LayerConfig::new(r, 16.0).with_init(init), seed);
        prop_assert_eq!(bits(&l.forward(&x).unwrap()), bits(&expected));
    }

    #[test]
    fn save_then_load_round_trips_bit_exactly(seed in 0u64..1000, inp in 1usize..32, out in 1usize..32, r1 in 1usize..9, r2 in 1usize..9, rslora: bool) {
        let model = vec![
            random_layer(&Spec { seed, inp, out, r: r1, alpha: 8.0, rslora, bias: false, fan_in_fan_out: false }),
            random_layer(&Spec { seed: seed + 10, inp: out, out: inp, r: r2, alpha: 3.0, rslora, bias: true, fan_in_fan_out: false }),
        ];
        let dir = tempfile::tempdir().unwrap();
        model.save_adapter(dir.path()).unwrap();
        let mut fresh: Vec<LoraLinear> = model.iter().map(|l| LoraLinear::new(l.weight().unwrap().clone(), l.bias().cloned())).collect();
        fresh.load_adapter(dir.path()).unwrap();
        let x = tensor(seed + 5, &[2, inp], 1.0);
        for (a, b) in model.iter().zip(&fresh) {
            let (aa, ba) = (a.adapter().unwrap(), b.adapter().unwrap());
            prop_assert_eq!(bits(aa.a()), bits(ba.a()));
            prop_assert_eq!(bits(aa.b()), bits(ba.b()));
            prop_assert_eq!(aa.scaling(), ba.scaling());
        }
        prop_assert_eq!(bits(&model[0].forward(&x).unwrap()), bits(&fresh[0].forward(&x).unwrap()));
    }
}

#[test]
fn mixed_rslora_layers_save_with_an_equivalent_alpha() {
    let model = vec![
        random_layer(&Spec {
            seed: 1,
            inp: 6,
            out: 5,
            r: 4,
            alpha: 8.0,
            rslora: true,
            bias: false,
            fan_in_fan_out: false,
        }),
        random_layer(&Spec {
            seed: 2,
            inp: 6,
            out: 5,
            r: 4,
            alpha: 8.0,
            rslora: true,
            bias: false,
            fan_in_fan_out: false,
        }),
        random_layer(&Spec {
            seed: 3,
            inp: 6,
            out: 5,
            r: 2,
            alpha: 3.0,
            rslora: false,
            bias: false,
            fan_in_fan_out: false,
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    let config = lora::LoraConfig::from_file(dir.path().join("adapter_config.json")).unwrap();
    assert!(config.use_rslora);
    assert_eq!(config.alpha_pattern.len(), 1, "{config:?}");
    let mut fresh: Vec<LoraLinear> = model
        .iter()
        .map(|l| LoraLinear::new(l.weight().unwrap().clone(), None))
        .collect();
    fresh.load_adapter(dir.path()).unwrap();
    for (a, b) in model.iter().zip(&fresh) {
        let (sa, sb) = (
            a.adapter().unwrap().scaling(),
            b.adapter().unwrap().scaling(),
        );
        assert!((sa - sb).abs() <= 4.0 * f64::EPSILON * sa, "{sa} vs {sb}");
    }
}

#[test]
fn init_adapter_registers_peft_names_and_only_adapters_train() {
    let mut model: Vec<LoraLinear> = (0..3)
        .map(|i| LoraLinear::new(tensor(i, &[8, 6], 1.0), None))
        .collect();
    let varmap = VarMap::new();
    model.init_adapter(&varmap).unwrap();
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    assert_eq!(names[0], "base_model.model.0.lora_A.weight");
    assert_eq!(names.len(), 6);
    assert_eq!(model.trainable_vars().len(), 6);
    // Gradients reach A and B only: the base weight is a plain tensor.
    let x = tensor(9, &[4, 6], 1.0);
    model[0]
        .adapter()
        .unwrap()
        .b()
        .set(&tensor(3, &[8, 8], 0.1))
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
    assert!(grads
        .get(model[0].adapter().unwrap().a().as_tensor())
        .is_some());
    assert!(grads
        .get(model[0].adapter().unwrap().b().as_tensor())
        .is_some());
}

#[test]
fn merge_is_all_or_nothing_and_refuses_double_merge_and_merged_loads() {
    let mut model = vec![
        random_layer(&Spec {
            seed: 1,
            inp: 6,
            out: 5,
            r: 2,
            alpha: 4.0,
            rslora: false,
            bias: false,
            fan_in_fan_out: false,
        }),
        random_layer(&Spec {
            seed: 2,
            inp: 6,
            out: 5,
            r: 2,
            alpha: 4.0,
            rslora: false,
            bias: false,
            fan_in_fan_out: false,
        }),
    ];
    let w = [
        bits(model[0].weight().unwrap()),
        bits(model[1].weight().unwrap()),
    ];
    model[1]
        .adapter()
        .unwrap()
        .b()
        .set(&Tensor::full(f32::NAN, (5, 2), &candle_core::Device::Cpu).unwrap())
        .unwrap();
    let err = model.merge().unwrap_err();
    assert!(
        matches!(err, lora::Error::NonFinite { ref path } if path == "1"),
        "{err}"
    );
    assert!(!model.is_merged());
    assert_eq!(
        [
            bits(model[0].weight().unwrap()),
            bits(model[1].weight().unwrap())
        ],
        w
    );

    model[1]
        .adapter()
        .unwrap()
        .b()
        .set(&tensor(4, &[5, 2], 0.5))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    model.merge().unwrap();
    assert!(matches!(model.merge(), Err(lora::Error::Merged { .. })));
    assert!(matches!(
        model.load_adapter(dir.path()),
        Err(lora::Error::Merged { .. })
    ));
    model.unmerge().unwrap();
    assert_eq!(
        [
            bits(model[0].weight().unwrap()),
            bits(model[1].weight().unwrap())
        ],
        w
    );
    assert!(matches!(model.unmerge(), Err(lora::Error::NotMerged)));
}

#[test]
fn dropout_only_in_training_mode() {
    let mut l = LoraLinear::new(tensor(1, &[16, 16], 1.0), None);
    common::init(&mut l, LayerConfig::new(4, 8.0).with_dropout(0.5), 1);
    l.adapter()
        .unwrap()
        .b()
        .set(&tensor(2, &[16, 4], 1.0))
        .unwrap();
    let x = tensor(3, &[8, 16], 1.0);
    let eval1 = l.forward(&x).unwrap();
    assert_eq!(bits(&eval1), bits(&l.forward(&x).unwrap()));
    let mut model = vec![l];
    model.set_training(true);
    let train = model[0].forward(&x).unwrap();
    assert_ne!(bits(&train), bits(&eval1));
    model.merge().unwrap();
    assert!(
        model[0].forward(&x).is_err(),
        "training a merged layer must be refused"
    );
}

#[test]
fn half_precision_merges_through_an_f32_delta() {
    use candle_core::DType;
    for dtype in [DType::F16, DType::BF16] {
        let w32 = tensor(1, &[32, 24], 1.0);
        let mut l = LoraLinear::new(w32.to_dtype(dtype).unwrap(), None);
        common::init(&mut l, LayerConfig::new(4, 8.0), 1);
        l.adapter()
            .unwrap()
            .b()
            .set(&tensor(2, &[32, 4], 0.5))
            .unwrap();
        let w0 = l.weight().unwrap().clone();
        let delta = l.delta_weight().unwrap();
        assert_eq!(delta.dtype(), DType::F32);
        l.merge().unwrap();
        // Reference: the exact sum in f32 rounded once to the target dtype; ours must equal it
        // to within one rounding (half an ulp of the result, i.e. 2^-11 for f16, 2^-8 for bf16).
        let reference = (w0.to_dtype(DType::F32).unwrap() + &delta).unwrap();
        let rel = if dtype == DType::F16 {
            2f32.powi(-11)
        } else {
            2f32.powi(-8)
        };
        let bound = reference.abs().unwrap().affine(rel as f64, 1e-6).unwrap();
        assert_within(
            &l.weight().unwrap().to_dtype(DType::F32).unwrap(),
            &reference,
            &bound,
            "half merge",
        );
        l.unmerge().unwrap();
        assert_eq!(bits(l.weight().unwrap()), bits(&w0));
    }
}
