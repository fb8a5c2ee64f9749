//! Many adapters on one base: named adapters, switching, PEFT's multi-adapter layout, weighted
//! combinations checked against the weighted sum of deltas, and mixed-adapter batches checked
//! against running each row alone.

mod common;

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarMap};
use common::{bits, tensor};
use lora::prelude::*;
use lora::{Combination, Error, LoadOptions};

#[lora(rank = 4, alpha = 8, targets = ["q_proj", "v_proj"])]
struct Attention {
    q_proj: Linear,
    v_proj: Linear,
}

#[lora]
struct Model {
    #[lora(nested)]
    layers: Vec<Attention>,
}

impl Model {
    fn new(seed: u64) -> Self {
        let layers = (0..2u64)
            .map(|i| Attention {
                q_proj: Linear::new(
                    tensor(seed + 10 * i, &[12, 12], 0.5),
                    Some(tensor(seed + 10 * i + 1, &[12], 0.5)),
                )
                .into(),
                v_proj: Linear::new(tensor(seed + 10 * i + 2, &[12, 12], 0.5), None).into(),
            })
            .collect();
        Self { layers }
    }

    /// The user's own forward: nothing adapter-specific in it.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = (l.q_proj.forward(&h)?.tanh()? + l.v_proj.forward(&h)?)?;
        }
        Ok(h)
    }
}

/// Gives the adapter `name` of every layer a random non-zero B.
fn randomize(model: &Model, name: &str, seed: u64) {
    for (i, (_, l, _)) in model.lora_layers().iter().enumerate() {
        let ad = l.adapter_named(name).unwrap();
        ad.b()
            .set(&tensor(seed + i as u64, ad.b().dims(), 0.5))
            .unwrap();
    }
}

/// A model with two adapters with random non-zero `B`: `default` (active) and `b`.
fn model_with_two_adapters() -> (Model, VarMap) {
    let mut m = Model::new(1);
    let vm = VarMap::new();
    m.init_adapter(&vm).unwrap();
    m.init_adapter_with(&vm, &InitOptions::default().with_name("b"))
        .unwrap();
    randomize(&m, "default", 100);
    randomize(&m, "b", 200);
    (m, vm)
}

#[test]
fn switching_adapters_is_exact_and_names_are_checked() {
    let (mut m, vm) = model_with_two_adapters();
    assert_eq!(m.adapters(), ["b", "default"]);
    assert_eq!(m.active_adapter().as_deref(), Some("default"));
    assert!(vm
        .data()
        .lock()
        .unwrap()
        .contains_key("base_model.model.layers.0.q_proj.lora_A.b.weight"));

    let x = tensor(7, &[3, 12], 1.0);
    let weights: Vec<Vec<u32>> = m
        .lora_layers()
        .iter()
        .map(|(_, l, _)| bits(common::linear(*l).weight().unwrap()))
        .collect();
    let y_default = m.forward(&x).unwrap();
    m.set_active_adapter(Some("b")).unwrap();
    let y_b = m.forward(&x).unwrap();
    assert_ne!(bits(&y_default), bits(&y_b));
    m.set_active_adapter(None).unwrap();
    let y_base = m.forward(&x).unwrap();
    assert_eq!(
        bits(&y_base),
        bits(&Model::new(1).forward(&x).unwrap()),
        "no adapter: exactly the base"
    );
    m.set_active_adapter(Some("default")).unwrap();
    assert_eq!(
        bits(&m.forward(&x).unwrap()),
        bits(&y_default),
        "switching back is exact"
    );
    let after: Vec<Vec<u32>> = m
        .lora_layers()
        .iter()
        .map(|(_, l, _)| bits(common::linear(*l).weight().unwrap()))
        .collect();
    assert_eq!(weights, after, "switching never touches base weights");

    // A mistyped name is an error, never a silent fallback to the base.
    let err = m.set_active_adapter(Some("dafault")).unwrap_err();
    assert!(matches!(err, Error::UnknownAdapter { .. }), "{err}");
    assert!(
        err.to_string().contains("`dafault`") && err.to_string().contains("`default`"),
        "{err}"
    );
    assert_eq!(m.active_adapter().as_deref(), Some("default"));

    // Only the active adapter trains.
    assert_eq!(m.trainable_vars().len(), 8);
    let active_a = m.layers[0].q_proj.adapter().unwrap().a().as_tensor().id();
    assert!(m
        .trainable_vars()
        .iter()
        .any(|v| v.as_tensor().id() == active_a));

    // Merge acts on the active adapter; switching while merged is refused.
    m.set_active_adapter(Some("b")).unwrap();
    m.merge().unwrap();
    let y_merged = m.forward(&x).unwrap();
    assert!(common::max_abs_diff(&y_merged, &y_b) < 1e-5);
    assert!(matches!(
        m.set_active_adapter(Some("default")),
        Err(Error::Merged { .. })
    ));
    assert!(matches!(m.delete_adapter("b"), Err(Error::Merged { .. })));
    m.unmerge().unwrap();
    m.delete_adapter("b").unwrap();
    assert_eq!(m.adapters(), ["default"]);
    assert_eq!(
        m.active_adapter(),
        Some("b".into()),
        "the deleted adapter's slot stays selected"
    );
    assert_eq!(
        bits(&m.forward(&x).unwrap()),
        bits(&y_base),
        "deleting the active adapter leaves the base"
    );
    assert!(matches!(
        m.delete_adapter("b"),
        Err(Error::UnknownAdapter { .. })
    ));
}

#[test]
fn several_adapters_save_in_peft_layout_and_load_back() {
    let (mut m, _) = model_with_two_adapters();
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter(dir.path()).unwrap();
    assert!(dir.path().join("adapter_model.safetensors").exists());
    assert!(dir.path().join("adapter_config.json").exists());
    assert!(dir
        .path()
        .join("b")
        .join("adapter_model.safetensors")
        .exists());

    let mut fresh = Model::new(1);
    fresh.load_adapter(dir.path()).unwrap();
    fresh
        .load_adapter_with(dir.path().join("b"), &LoadOptions::default().with_name("b"))
        .unwrap();
    assert_eq!(fresh.active_adapter().as_deref(), Some("default"));
    let x = tensor(7, &[3, 12], 1.0);
    for name in ["default", "b"] {
        m.set_active_adapter(Some(name)).unwrap();
        fresh.set_active_adapter(Some(name)).unwrap();
        assert_eq!(
            bits(&m.forward(&x).unwrap()),
            bits(&fresh.forward(&x).unwrap()),
            "{name}"
        );
    }
}

/// `sum_i w_i s_i B_i A_i` of one layer, in f64 on the host.
fn weighted_delta(l: &LoraLinear, parts: &[(&str, f64)]) -> Vec<f64> {
    let (out, inp) = (l.out_features(), l.in_features());
    let mut acc = vec![0f64; out * inp];
    for (name, w) in parts {
        let ad = l.adapter_named(name).unwrap();
        let a: Vec<Vec<f32>> = ad.a().as_tensor().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = ad.b().as_tensor().to_vec2().unwrap();
        for i in 0..out {
            for j in 0..inp {
                let d: f64 = (0..ad.rank())
                    .map(|k| f64::from(b[i][k]) * f64::from(a[k][j]))
                    .sum();
                acc[i * inp + j] += w * ad.scaling() * d;
            }
        }
    }
    acc
}

fn delta_of(l: &LoraLinear, name: &str) -> Vec<f64> {
    weighted_delta(common::linear(l), &[(name, 1.0)])
}

fn max_err(a: &[f64], b: &[f64]) -> (f64, f64) {
    let err = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    (err, scale)
}

fn model_with_rslora_adapter() -> Model {
    let (mut m, _) = model_with_two_adapters();
    // Adapter "c": rank 2, rsLoRA, built by combining nothing but itself is not possible, so load
    // it from a file written by a model whose struct declares another config.
    let dir = tempfile::tempdir().unwrap();
    let mut donor = Model::new(1);
    donor
        .init_adapter_with(
            &VarMap::new(),
            &InitOptions::default()
                .with_config(LayerConfig::new(2, 3.0).with_rslora(true))
                .with_seed(5),
        )
        .unwrap();
    randomize(&donor, "default", 300);
    donor.save_adapter(dir.path()).unwrap();
    m.load_adapter_with(dir.path(), &LoadOptions::default().with_name("c"))
        .unwrap();
    assert!(m.layers[0].q_proj.adapter_named("c").unwrap().use_rslora());
    m
}

#[test]
fn cat_and_svd_combinations_equal_the_weighted_sum_of_deltas() {
    let mut m = model_with_rslora_adapter();
    let parts = [("default", 0.7), ("b", -1.3), ("c", 2.0)];
    m.add_weighted_adapter(&parts, Combination::Cat, "cat")
        .unwrap();
    m.add_weighted_adapter(&parts, Combination::Svd { rank: 10 }, "svd_full")
        .unwrap();
    m.add_weighted_adapter(&parts, Combination::Svd { rank: 3 }, "svd_3")
        .unwrap();
    for (_, l, _) in m.lora_layers() {
        let want = weighted_delta(common::linear(l), &parts);
        assert_eq!(l.adapter_named("cat").unwrap().rank(), 10);
        // f32 factors: each entry is a sum of 10 products of f32 values; 1e-5 of the scale covers
        // the rounding of the folded B (one f32 rounding) and of the f64 -> f32 factors.
        for name in ["cat", "svd_full"] {
            let (err, scale) = max_err(&delta_of(common::linear(l), name), &want);
            assert!(err <= 1e-5 * scale, "{name}: {err} vs scale {scale}");
        }
        // A rank-3 truncation is no worse than any rank-3 candidate, e.g. the first adapter's
        // rank-3 part alone: compare against the optimum in Frobenius norm from the SVD itself
        // (Eckart-Young): the residual must be smaller than that of keeping the full delta minus
        // one adapter.
        let low = delta_of(common::linear(l), "svd_3");
        let resid: f64 = low
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let total: f64 = want.iter().map(|y| y * y).sum::<f64>().sqrt();
        assert!(
            resid < total,
            "the truncation must capture part of the delta"
        );
        assert_eq!(l.adapter_named("svd_3").unwrap().rank(), 3);
    }
    // The combined adapter behaves like the weighted sum in a forward too.
    let x = tensor(9, &[2, 12], 1.0);
    m.set_active_adapter(Some("cat")).unwrap();
    let y_cat = m.layers[0].q_proj.forward(&x).unwrap();
    m.set_active_adapter(Some("svd_full")).unwrap();
    let y_svd = m.layers[0].q_proj.forward(&x).unwrap();
    assert!(common::max_abs_diff(&y_cat, &y_svd) < 1e-4);
}

#[test]
fn linear_combination_is_peft_formula_and_refuses_unequal_ranks() {
    let mut m = model_with_rslora_adapter();
    // Exact for a single adapter (also with a negative weight).
    m.add_weighted_adapter(&[("b", -0.5)], Combination::Linear, "half_b")
        .unwrap();
    // Approximate for several: A = sum sqrt(|w| s) A_i, B = sum sign(w) sqrt(|w| s) B_i.
    m.add_weighted_adapter(&[("default", 0.5), ("b", 0.5)], Combination::Linear, "lin")
        .unwrap();
    for (_, l, _) in m.lora_layers() {
        let (err, scale) = max_err(
            &delta_of(common::linear(l), "half_b"),
            &weighted_delta(common::linear(l), &[("b", -0.5)]),
        );
        assert!(err <= 1e-5 * scale, "{err}");
        let (d, b) = (
            l.adapter_named("default").unwrap(),
            l.adapter_named("b").unwrap(),
        );
        let k = |ad: &lora::Adapter| (0.5 * ad.scaling()).sqrt();
        let a_want = (d.a().as_tensor() * k(d))
            .unwrap()
            .add(&(b.a().as_tensor() * k(b)).unwrap())
            .unwrap();
        let lin = l.adapter_named("lin").unwrap();
        assert!(common::max_abs_diff(lin.a().as_tensor(), &a_want) < 1e-6);
        assert_eq!(lin.scaling(), 1.0);
    }
    let err = m
        .add_weighted_adapter(&[("default", 1.0), ("c", 1.0)], Combination::Linear, "bad")
        .unwrap_err();
    assert!(err.to_string().contains("equal rank"), "{err}");
    assert!(
        !m.adapters().contains(&"bad".to_string()),
        "a failed combination adds nothing"
    );
    assert!(matches!(
        m.add_weighted_adapter(&[("nope", 1.0)], Combination::Cat, "x"),
        Err(Error::UnknownAdapter { .. })
    ));
}

#[test]
fn mixed_adapter_batches_equal_each_row_alone() {
    let mut m = model_with_rslora_adapter();
    let x = tensor(11, &[5, 3, 12], 1.0);
    let rows = [Some("default"), None, Some("c"), Some("b"), Some("default")];
    m.set_batch_adapters(Some(&rows)).unwrap();
    let y = m.forward(&x).unwrap();
    m.set_batch_adapters(None).unwrap();
    for (i, row) in rows.iter().enumerate() {
        m.set_active_adapter(*row).unwrap();
        let alone = m.forward(&x.narrow(0, i, 1).unwrap()).unwrap();
        let got = y.narrow(0, i, 1).unwrap();
        // Same products in another order: within a few f32 ulps of the outputs (|y| < 4).
        assert!(
            common::max_abs_diff(&got, &alone) < 1e-5,
            "row {i} ({row:?})"
        );
    }
    // A new assignment while routing stays on (the stacks are reused, only the masks change),
    // with another batch size: still each row alone.
    m.set_batch_adapters(Some(&rows)).unwrap();
    let rows2 = [Some("c"), Some("c"), None];
    m.set_batch_adapters(Some(&rows2)).unwrap();
    let x3 = tensor(13, &[3, 2, 12], 1.0);
    let y3 = m.forward(&x3).unwrap();
    m.set_batch_adapters(None).unwrap();
    for (i, row) in rows2.iter().enumerate() {
        m.set_active_adapter(*row).unwrap();
        let alone = m.forward(&x3.narrow(0, i, 1).unwrap()).unwrap();
        assert!(
            common::max_abs_diff(&y3.narrow(0, i, 1).unwrap(), &alone) < 1e-5,
            "reassigned row {i}"
        );
    }
    // Layer level: the same without going through the model.
    let x2 = tensor(12, &[4, 12], 1.0);
    let names = [Some("b"), Some("c"), None, Some("b")];
    let y2 = m.layers[0]
        .q_proj
        .forward_with_adapters(&x2, &names)
        .unwrap();
    for (i, row) in names.iter().enumerate() {
        m.set_active_adapter(*row).unwrap();
        let alone = m.layers[0]
            .q_proj
            .forward(&x2.narrow(0, i, 1).unwrap())
            .unwrap();
        assert!(
            common::max_abs_diff(&y2.narrow(0, i, 1).unwrap(), &alone) < 1e-5,
            "layer row {i}"
        );
    }
    // Unknown names and training are refused.
    assert!(matches!(
        m.set_batch_adapters(Some(&[Some("zz")])),
        Err(Error::UnknownAdapter { .. })
    ));
    m.set_batch_adapters(Some(&rows)).unwrap();
    m.set_training(true);
    assert!(m.forward(&x).is_err());
    m.set_training(false);
    // Merging clears the routing (routed deltas on top of a merged one would count twice).
    m.set_active_adapter(Some("b")).unwrap();
    m.merge().unwrap();
    let merged = m.forward(&x).unwrap();
    m.unmerge().unwrap();
    m.set_batch_adapters(None).unwrap();
    let unmerged = m.forward(&x).unwrap();
    assert!(common::max_abs_diff(&merged, &unmerged) < 1e-5);
}
