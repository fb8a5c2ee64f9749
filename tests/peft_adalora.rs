//! AdaLoRA against PEFT 0.21.2: fixtures written by `scripts/peft_adalora_fixtures.py` (real
//! PyTorch + PEFT `AdaLoraConfig` adapters with random `E` and `B`, see
//! `tests/fixtures/peft/adalora/`), read here: the unmerged and merged outputs, the merged weights
//! and the gradients of `A`, `E`, `B` match PEFT's; the unmerge restores the base bit for bit; a
//! rank pattern (pruned singular values) loads as PEFT loads it. Single-layer tests check the
//! forward and its gradients against the formula and finite differences, and the refusals.
//!
//! Tolerances as in `tests/peft_interop.rs`: outputs and gradients `max |ours - PEFT| <= 1e-4 *
//! max |PEFT|` (f32, different summation orders through two residual layers), merged weights
//! `1e-5`.
//!
//! The reverse check (an adapter saved here, loaded by PEFT) is the ignored test
//! `write_rust_adalora_adapters` plus the script's `--check-rust-adapter` (see the script); it
//! includes the adapter of PEFT's recorded run replayed here and pruned to its rank pattern.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Embedding, Linear, VarMap};
use common::reference::{assert_close, f32s, load, rel_err};
use lora::prelude::*;
use lora::{
    train::RankAllocator, AdaLoraSchedule, Adapter, InitOptions, LayerConfig, LayerError,
    LoraConfig, LoraEmbedding, LoraLayer, DEFAULT_ADAPTER,
};

const WEIGHT_RTOL: f32 = 1e-5;
const OUTPUT_RTOL: f32 = 1e-4;
const N_LAYERS: usize = 2;

type Weights = HashMap<String, Tensor>;

// ---------------------------------------------------------------------------------------------
// The Llama-like model of `scripts/peft_fixtures.py` (biased projections), LoRA layers on the
// three projections the fixtures target. The macro's rank and alpha are unused: the adapters
// come from the files or from a run-time AdaLoRA config.

#[lora(rank = 4, alpha = 8, targets = ["q_proj", "v_proj"])]
struct Attn {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[lora(rank = 4, alpha = 8, targets = ["down_proj"])]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[lora]
struct Layer {
    #[lora(nested)]
    self_attn: Attn,
    #[lora(nested)]
    mlp: Mlp,
}

#[lora]
struct Inner {
    #[lora(nested)]
    layers: Vec<Layer>,
}

#[lora]
struct Llama {
    #[lora(nested)]
    model: Inner,
}

fn tensor(w: &Weights, name: &str) -> Result<Tensor> {
    w.get(name)
        .cloned()
        .with_context(|| format!("no tensor `{name}`"))
}

fn linear<T: From<Linear>>(w: &Weights, p: &str) -> Result<T> {
    Ok(Linear::new(
        tensor(w, &format!("{p}.weight"))?,
        w.get(&format!("{p}.bias")).cloned(),
    )
    .into())
}

impl Llama {
    fn build(w: &Weights) -> Result<Self> {
        let layers = (0..N_LAYERS)
            .map(|i| {
                let (a, m) = (
                    format!("model.layers.{i}.self_attn"),
                    format!("model.layers.{i}.mlp"),
                );
                Ok(Layer {
                    self_attn: Attn {
                        q_proj: linear(w, &format!("{a}.q_proj"))?,
                        k_proj: linear(w, &format!("{a}.k_proj"))?,
                        v_proj: linear(w, &format!("{a}.v_proj"))?,
                        o_proj: linear(w, &format!("{a}.o_proj"))?,
                    },
                    mlp: Mlp {
                        gate_proj: linear(w, &format!("{m}.gate_proj"))?,
                        up_proj: linear(w, &format!("{m}.up_proj"))?,
                        down_proj: linear(w, &format!("{m}.down_proj"))?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            model: Inner { layers },
        })
    }

    /// Per layer: `h += o(q(h) * sigmoid(k(h)) + v(h))`, `h += down(silu(gate(h)) * up(h))`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.model.layers {
            let at = &l.self_attn;
            let gate = candle_nn::ops::sigmoid(&at.k_proj.forward(&h)?)?;
            let a = ((at.q_proj.forward(&h)? * gate)? + at.v_proj.forward(&h)?)?;
            h = (&h + at.o_proj.forward(&a)?)?;
            let m = &l.mlp;
            let a = (m.gate_proj.forward(&h)?.silu()? * m.up_proj.forward(&h)?)?;
            h = (&h + m.down_proj.forward(&a)?)?;
        }
        Ok(h)
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/adalora")
}

fn assert_bit_equal(what: &str, ours: &Tensor, reference: &Tensor) -> Result<()> {
    ensure!(ours.dims() == reference.dims(), "{what}: shapes differ");
    let (o, r) = (f32s(ours)?, f32s(reference)?);
    ensure!(
        o.iter().zip(&r).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: not bit-identical"
    );
    Ok(())
}

fn weight(layer: &dyn LoraLayer) -> Tensor {
    layer
        .downcast_ref::<LoraLinear>()
        .expect("a LoraLinear")
        .weight()
        .expect("a dense weight")
        .clone()
}

/// Loads the case's PEFT adapter and checks the unmerged output, the merge (output and
/// weights) and the exact unmerge against PEFT. Returns the model with the adapter loaded.
fn check_case(case: &str) -> Result<Llama> {
    let dir = fixtures().join(case);
    let base = load(&fixtures().join("base.safetensors"))?;
    let merged_ref = load(&dir.join("merged.safetensors"))?;
    let io = load(&dir.join("io.safetensors"))?;
    let x = tensor(&io, "input")?;
    let mut model = Llama::build(&base)?;
    model.load_adapter(dir.join("adapter"))?;
    let layers = model.lora_layers();
    ensure!(layers.len() == 6, "{case}: {} LoRA layers", layers.len());
    for (path, layer, _) in &layers {
        let ad = layer
            .adapter()
            .with_context(|| format!("{path}: no adapter"))?;
        ensure!(ad.is_adalora(), "{path}: not an AdaLoRA adapter");
        ensure!(
            ad.ranknum() == Some(4),
            "{path}: ranknum {:?}",
            ad.ranknum()
        );
    }
    drop(layers);

    let unmerged = model.forward(&x)?;
    let e_unmerged = assert_close(
        &format!("{case}: unmerged output"),
        &unmerged,
        &tensor(&io, "unmerged_output")?,
        OUTPUT_RTOL,
    )?;
    model.merge()?;
    let e_merged = assert_close(
        &format!("{case}: merged output"),
        &model.forward(&x)?,
        &tensor(&io, "merged_output")?,
        OUTPUT_RTOL,
    )?;
    let mut e_weight = 0f32;
    for (path, layer, _) in model.lora_layers() {
        ensure!(layer.is_merged(), "{path}: not merged");
        e_weight = e_weight.max(assert_close(
            &format!("{case}: merged {path}.weight"),
            &weight(layer),
            &tensor(&merged_ref, &format!("{path}.weight"))?,
            WEIGHT_RTOL,
        )?);
    }
    model.unmerge()?;
    for (path, layer, _) in model.lora_layers() {
        let name = format!("{path}.weight");
        assert_bit_equal(&name, &weight(layer), &tensor(&base, &name)?)?;
    }
    assert_bit_equal(
        &format!("{case}: output after unmerge"),
        &model.forward(&x)?,
        &unmerged,
    )?;
    println!(
        "{case}: rel. error unmerged output {e_unmerged:.2e}, merged output {e_merged:.2e}, merged weights {e_weight:.2e}"
    );
    Ok(model)
}

#[test]
fn plain_adapter_matches_peft() -> Result<()> {
    check_case("plain").map(drop)
}

/// A rank pattern: PEFT saved only the kept singular values of three modules and loads them at
/// the smaller rank with `ranknum = init_r`; the outputs are those of PEFT's reloaded model.
#[test]
fn rank_pattern_adapter_matches_peft() -> Result<()> {
    let model = check_case("pattern")?;
    let ranks: Vec<(String, usize)> = model
        .lora_layers()
        .into_iter()
        .map(|(p, l, _)| (p, l.adapter().map_or(0, Adapter::rank)))
        .collect();
    let rank_of = |p: &str| ranks.iter().find(|(q, _)| q == p).map(|(_, r)| *r);
    ensure!(rank_of("model.layers.0.self_attn.q_proj") == Some(2));
    ensure!(rank_of("model.layers.1.self_attn.v_proj") == Some(1));
    ensure!(rank_of("model.layers.0.mlp.down_proj") == Some(4));
    ensure!(rank_of("model.layers.1.mlp.down_proj") == Some(4));
    Ok(())
}

/// The gradients of `sum(output * grad_output)` with respect to every `A`, `E` and `B`, against
/// PEFT's, under the file keys.
#[test]
fn gradients_of_a_e_and_b_match_peft() -> Result<()> {
    let dir = fixtures().join("plain");
    let io = load(&dir.join("io.safetensors"))?;
    let mut model = Llama::build(&load(&fixtures().join("base.safetensors"))?)?;
    model.load_adapter(dir.join("adapter"))?;
    let vars = model.named_trainable_vars();
    let names: BTreeSet<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    let expected: BTreeSet<String> = io
        .keys()
        .filter_map(|k| k.strip_prefix("grad."))
        .map(str::to_string)
        .collect();
    ensure!(names == expected, "ours {names:?}, PEFT's {expected:?}");
    ensure!(names.iter().filter(|n| n.ends_with(".lora_E")).count() == 6);
    let y = model.forward(&tensor(&io, "input")?)?;
    let grads = (y * tensor(&io, "grad_output")?)?.sum_all()?.backward()?;
    let mut worst = 0f32;
    for (name, var) in &vars {
        let ours = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        worst = worst.max(assert_close(
            &format!("gradient of {name}"),
            ours,
            &tensor(&io, &format!("grad.{name}"))?,
            OUTPUT_RTOL,
        )?);
    }
    println!(
        "gradients of {} variables, worst relative error {worst:.2e}",
        vars.len()
    );
    Ok(())
}

/// `merge_safetensors` (the `lora merge` command) on the file: PEFT's merged weights for both
/// cases (the rank pattern's smaller factors with `ranknum = init_r`), other tensors untouched.
#[test]
fn merge_file_matches_peft() -> Result<()> {
    let base_path = fixtures().join("base.safetensors");
    let base = load(&base_path)?;
    for case in ["plain", "pattern"] {
        let dir = fixtures().join(case);
        let tmp = tempfile::tempdir()?;
        let out = tmp.path().join("merged.safetensors");
        let report = lora::merge_file::merge_safetensors(
            &base_path,
            &dir.join("adapter"),
            &out,
            &mut |_, _| {},
        )?;
        ensure!(report.merged == 6, "{case}: merged {}", report.merged);
        let ours = load(&out)?;
        let reference = load(&dir.join("merged.safetensors"))?;
        let mut worst = 0f32;
        for (name, r) in &reference {
            let o = tensor(&ours, name)?;
            if name.ends_with("q_proj.weight")
                || name.ends_with("v_proj.weight")
                || name.ends_with("down_proj.weight")
            {
                worst = worst.max(assert_close(
                    &format!("{case}: {name}"),
                    &o,
                    r,
                    WEIGHT_RTOL,
                )?);
            } else {
                assert_bit_equal(&format!("{case}: {name}"), &o, &tensor(&base, name)?)?;
            }
        }
        println!("{case}: merge_safetensors worst relative error {worst:.2e}");
    }
    Ok(())
}

/// A schedule PEFT accepts (`total_step` set, a budgeting phase).
fn schedule() -> AdaLoraSchedule {
    AdaLoraSchedule {
        total_step: Some(10),
        ..AdaLoraSchedule::default()
    }
}

/// A `[5, 6]` f64 layer with a bias and an AdaLoRA adapter of rank 3, `ranknum` 4, random
/// `A`, `E`, `B`.
fn adalora_layer() -> Result<LoraLinear> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f64, 1.0, (5, 6), &dev)?;
    let bias = Tensor::randn(0f64, 1.0, 5, &dev)?;
    let mut l = LoraLinear::new(w, Some(bias));
    let var = |shape: (usize, usize)| -> Result<Var> {
        Ok(Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &dev)?)?)
    };
    let ad = Adapter::new(var((3, 6))?, var((5, 3))?, 6.0, false, 0.0)?.with_adalora(
        var((3, 1))?,
        4,
        schedule(),
    )?;
    l.insert_adapter(DEFAULT_ADAPTER, ad)?;
    Ok(l)
}

/// PEFT's `SVDLinear.forward` written out: `x W^T + b + ((x (A * E)^T) B^T) * alpha / (ranknum + 1e-5)`.
fn reference(l: &LoraLinear, x: &Tensor) -> Result<Tensor> {
    let ad = l.adapter().context("no adapter")?;
    let ae = ad
        .a()
        .as_tensor()
        .broadcast_mul(ad.e().context("no E")?.as_tensor())?;
    let base = x
        .matmul(&l.weight().unwrap().t()?)?
        .broadcast_add(l.bias().context("no bias")?)?;
    let lora = x
        .matmul(&ae.t()?)?
        .matmul(&ad.b().as_tensor().t()?)?
        .affine(ad.alpha() / (4.0 + 1e-5), 0.0)?;
    Ok((base + lora)?)
}

#[test]
fn forward_is_peft_s_formula_and_merge_unmerge_are_exact() -> Result<()> {
    let mut l = adalora_layer()?;
    let ad = l.adapter().context("no adapter")?;
    assert_eq!(ad.scaling(), 6.0 / (4.0 + 1e-5));
    assert_eq!(ad.num_parameters(), 3 * (6 + 5) + 3);
    let x = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu)?;
    let y = l.forward(&x)?;
    ensure!(rel_err(&y, &reference(&l, &x)?)? < 1e-12);
    let w0 = l.weight().unwrap().copy()?;
    let merged = l.prepare_merge()?;
    // W + B (A * E) * alpha / (ranknum + 1e-5)
    let ad = l.adapter().context("no adapter")?;
    let ae = ad
        .a()
        .as_tensor()
        .broadcast_mul(ad.e().context("no E")?.as_tensor())?;
    let expected = (&w0 + ad.b().as_tensor().matmul(&ae)?.affine(ad.scaling(), 0.0)?)?;
    // The merge adds the delta in f32 (as for every layer).
    ensure!(rel_err(&merged.clone().into_tensor(), &expected)? < 1e-6);
    l.commit_merge(merged);
    ensure!(rel_err(&l.forward(&x)?, &y)? < 1e-6);
    l.revert_merge()?;
    let same = (l.weight()? - &w0)?.abs()?.max_all()?.to_scalar::<f64>()?;
    ensure!(same == 0.0, "unmerge is not exact: {same}");
    Ok(())
}

/// Central finite differences of PEFT's formula against the gradients of `A`, `E`, `B` (f64);
/// the frozen weight gets none.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let l = adalora_layer()?;
    let ad = l.adapter().context("no adapter")?.clone();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.0, (4, 6), &dev)?;
    let c = Tensor::randn(0f64, 1.0, (4, 5), &dev)?;
    let loss = |y: &Tensor| -> Result<Tensor> { Ok((y * &c)?.sum_all()?) };
    let grads = loss(&l.forward(&x)?)?.backward()?;
    let vars = ad.vars();
    ensure!(vars.len() == 3, "A, B and E are trainable: {}", vars.len());
    for (factor, var) in vars {
        let analytic = f64s(grads.get(var.as_tensor()).context("no gradient")?)?;
        let original = var.as_tensor().copy()?;
        let flat = f64s(&original)?;
        let h = 1e-6;
        for (i, g) in analytic.iter().enumerate() {
            let at = |delta: f64| -> Result<f64> {
                let mut v = flat.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, original.shape(), &dev)?)?;
                Ok(loss(&reference(&l, &x)?)?.to_scalar::<f64>()?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            ensure!(
                (numeric - g).abs() <= 1e-6 * (1.0 + g.abs()),
                "{factor} [{i}]: analytic {g}, numeric {numeric}"
            );
        }
        var.set(&original)?;
    }
    ensure!(
        grads.get(l.weight().unwrap()).is_none(),
        "no gradient for W"
    );
    Ok(())
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// A fresh AdaLoRA adapter is PEFT's `reset_lora_parameters`: `E = 0`, `A`, `B ~ N(0, 0.02)`,
/// `ranknum = r`; it changes nothing. Chosen at run time for a `#[lora]` model.
#[test]
fn fresh_adapters_start_as_peft_s_and_change_nothing() -> Result<()> {
    let base = load(&fixtures().join("base.safetensors"))?;
    let mut model = Llama::build(&base)?;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu)?;
    let y0 = model.forward(&x)?;
    let config = LoraConfig::adalora(6, 12.0, ["q_proj", "v_proj", "down_proj"], schedule());
    let varmap = VarMap::new();
    model.init_adapter_with(&varmap, &InitOptions::default().with_peft_config(config))?;
    let mut values = Vec::new();
    for (path, layer, _) in model.lora_layers() {
        let ad = layer
            .adapter()
            .with_context(|| format!("{path}: no adapter"))?;
        ensure!(ad.is_adalora() && ad.rank() == 6 && ad.ranknum() == Some(6));
        let e = ad.e().context("no E")?;
        ensure!(e.dims() == [6, 1] && f32s(e)?.iter().all(|&v| v == 0.0));
        values.extend(f32s(ad.a())?);
        values.extend(f32s(ad.b())?);
    }
    let n = values.len() as f32;
    let mean = values.iter().sum::<f32>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
    ensure!(
        mean.abs() < 2e-3 && (std - 0.02).abs() < 2e-3,
        "mean {mean}, std {std}"
    );
    ensure!(
        model.named_trainable_vars().len() == 18,
        "A, E, B of 6 layers"
    );
    assert_bit_equal("fresh AdaLoRA output", &model.forward(&x)?, &y0)?;
    Ok(())
}

/// Saved files: PEFT's keys (no `.weight`, no `ranknum`), `peft_type: ADALORA`, and a rank
/// pattern for layers that hold fewer singular values than `init_r`; loading them back gives the
/// same outputs.
#[test]
fn saved_adapters_have_peft_s_keys_and_round_trip() -> Result<()> {
    let io = load(&fixtures().join("pattern/io.safetensors"))?;
    let x = tensor(&io, "input")?;
    let base = load(&fixtures().join("base.safetensors"))?;
    let mut model = Llama::build(&base)?;
    model.load_adapter(fixtures().join("pattern/adapter"))?;
    let y = model.forward(&x)?;
    let dir = tempfile::tempdir()?;
    model.save_adapter(dir.path())?;
    let saved = load(&dir.path().join("adapter_model.safetensors"))?;
    let peft_saved = load(&fixtures().join("pattern/adapter/adapter_model.safetensors"))?;
    let keys = |w: &Weights| w.keys().cloned().collect::<BTreeSet<_>>();
    ensure!(keys(&saved) == keys(&peft_saved), "keys differ from PEFT's");
    for (k, v) in &saved {
        assert_bit_equal(k, v, &peft_saved[k])?;
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("adapter_config.json"),
    )?)?;
    ensure!(config["peft_type"] == "ADALORA" && config["init_r"] == 4);
    ensure!(config["total_step"] == 10 && config["target_r"] == 2 && config["deltaT"] == 2);
    let pattern = config["rank_pattern"].as_object().context("rank_pattern")?;
    ensure!(pattern.len() == 2, "{pattern:?}");
    ensure!(
        pattern["model.layers.0.self_attn.q_proj.lora_E"]
            == serde_json::json!([true, true, false, false])
    );
    let mut again = Llama::build(&base)?;
    again.load_adapter(dir.path())?;
    assert_bit_equal("reloaded output", &again.forward(&x)?, &y)?;
    Ok(())
}

#[test]
fn refusals_are_clear() -> Result<()> {
    let dev = Device::Cpu;
    let config = LayerConfig::new(2, 4.0).with_adalora(Some(schedule()));
    // Embeddings (and convolutions) take plain LoRA only.
    let emb = LoraEmbedding::from(Embedding::new(Tensor::randn(0f32, 1.0, (7, 4), &dev)?, 4));
    let err = emb.fresh_adapter(&config, 0).unwrap_err();
    assert!(
        matches!(err, LayerError::Refused(_)) && err.to_string().contains("AdaLoRA"),
        "{err}"
    );
    let conv = lora::LoraConv1d::from(candle_nn::Conv1d::new(
        Tensor::randn(0f32, 1.0, (4, 3, 3), &dev)?,
        None,
        candle_nn::Conv1dConfig::default(),
    ));
    let err = conv.fresh_adapter(&config, 0).unwrap_err();
    assert!(err.to_string().contains("AdaLoRA"), "{err}");
    // An AdaLoRA adapter made elsewhere is refused by a convolution too.
    let mut conv = conv;
    let ad = adalora_layer()?.adapter().context("no adapter")?.clone();
    let err = conv.insert_adapter(DEFAULT_ADAPTER, ad).unwrap_err();
    assert!(
        matches!(err, LayerError::FactorShape { .. } | LayerError::Refused(_)),
        "{err}"
    );
    // Saving without `total_step` (PEFT would refuse the file): refused, nothing written.
    let mut l = LoraLinear::new(Tensor::randn(0f32, 1.0, (5, 6), &dev)?, None);
    let no_total = LayerConfig::new(2, 4.0).with_adalora(Some(AdaLoraSchedule::default()));
    l.init_adapter_with(
        &VarMap::new(),
        &InitOptions::default().with_config(no_total),
    )?;
    let dir = tempfile::tempdir()?;
    let err = l.save_adapter(dir.path().join("a")).unwrap_err();
    assert!(err.to_string().contains("total_step"), "{err}");
    assert!(!dir.path().join("a").exists());
    // DoRA with AdaLoRA.
    let l = LoraLinear::new(Tensor::randn(0f32, 1.0, (5, 6), &dev)?, None);
    let err = l.fresh_adapter(&config.with_dora(true), 0).unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");
    let json = r#"{"peft_type": "ADALORA", "init_r": 4, "use_dora": true, "total_step": 5, "target_modules": ["q_proj"]}"#;
    let err = LoraConfig::from_json(json)?.validate().unwrap_err();
    assert!(err.to_string().contains("use_dora"), "{err}");
    // Mixed-adapter batches.
    let mut l = adalora_layer()?;
    let plain = l.fresh_adapter(&LayerConfig::new(2, 4.0), 1)?;
    l.insert_adapter("plain", plain)?;
    let x = Tensor::randn(0f64, 1.0, (2, 6), &dev)?;
    let err = l
        .forward_with_adapters(&x, &[Some(DEFAULT_ADAPTER), None])
        .unwrap_err();
    assert!(
        matches!(err, LayerError::Refused(_)) && err.to_string().contains("AdaLoRA"),
        "{err}"
    );
    l.forward_with_adapters(&x, &[Some("plain"), None])?;
    // An AdaLoRA `lora_E` under a LoRA config, and a rank pattern of the wrong length.
    let json = r#"{"peft_type": "ADALORA", "init_r": 4, "total_step": 5, "target_modules": ["q_proj"], "rank_pattern": {"q_proj.lora_E": [true, false]}}"#;
    let err = LoraConfig::from_json(json)?.validate().unwrap_err();
    assert!(err.to_string().contains("rank_pattern"), "{err}");
    Ok(())
}

/// Writes Rust-made AdaLoRA adapters for the reverse check by PEFT
/// (`scripts/peft_adalora_fixtures.py --check-rust-adapter DIR`): `fresh` (made here with a
/// run-time AdaLoRA config, then `E` and `B` set to random values) and `pattern` (PEFT's pruned
/// adapter loaded and saved again here). Each directory also gets `io.safetensors` with the
/// fixture input and the Rust output.
#[test]
#[ignore = "writes adapters for the PEFT reverse check; set PEFT_ADALORA_OUT"]
fn write_rust_adalora_adapters() -> Result<()> {
    let out = PathBuf::from(std::env::var("PEFT_ADALORA_OUT").context("set PEFT_ADALORA_OUT")?);
    let base = load(&fixtures().join("base.safetensors"))?;
    let x = tensor(&load(&fixtures().join("plain/io.safetensors"))?, "input")?;
    let write_io = |dir: &Path, y: &Tensor| -> Result<()> {
        let io = HashMap::from([
            ("input".to_string(), x.clone()),
            ("output".to_string(), y.clone()),
        ]);
        candle_core::safetensors::save(&io, dir.join("io.safetensors"))?;
        Ok(())
    };

    let mut model = Llama::build(&base)?;
    let config = LoraConfig::adalora(5, 10.0, ["q_proj", "v_proj", "down_proj"], schedule());
    model.init_adapter_with(
        &VarMap::new(),
        &InitOptions::default().with_peft_config(config),
    )?;
    for (i, (_, layer, _)) in model.lora_layers().into_iter().enumerate() {
        let ad = layer.adapter().context("no adapter")?;
        let e = ad.e().context("no E")?;
        e.set(&Tensor::randn(0f32, 1.0, e.dims(), &Device::Cpu)?)?;
        ad.b().set(
            &Tensor::randn(0f32, 0.3, ad.b().dims(), &Device::Cpu)?
                .affine(1.0 + i as f64 * 0.1, 0.0)?,
        )?;
    }
    let dir = out.join("fresh");
    model.save_adapter(&dir)?;
    write_io(&dir, &model.forward(&x)?)?;

    let mut model = Llama::build(&base)?;
    model.load_adapter(fixtures().join("pattern/adapter"))?;
    let dir = out.join("pattern");
    model.save_adapter(&dir)?;
    write_io(&dir, &model.forward(&x)?)?;

    // PEFT's recorded run replayed through the allocator, pruned to the final rank pattern.
    let (steps, patterns) = alloc_run()?;
    let mut model = alloc_model()?;
    let vars = recorded_vars(&model);
    let mut allocator = RankAllocator::new(&model)?;
    for step in 1..=patterns.len() {
        replay_step(&mut allocator, &vars, &steps, step)?;
    }
    allocator.prune(&mut model)?;
    let dir = out.join("allocated");
    model.save_adapter(&dir)?;
    write_io(&dir, &model.forward(&x)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rank allocation: PEFT's training run of the `alloc` fixture (12 AdamW steps, an allocation
// every other step between tinit 2 and total_step - tfinal = 9, the final mask at 9 and
// re-applied after it) replayed through `RankAllocator`: at each step the factors and the
// gradients PEFT's allocator saw, then E and the rank pattern compared with PEFT's after
// `update_and_allocate`.

fn alloc_expected() -> Result<serde_json::Value> {
    let path = fixtures().join("alloc/expected.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// PEFT's recorded run: the tensors of each step and the rank pattern after each step.
fn alloc_run() -> Result<(Weights, Vec<serde_json::Value>)> {
    let steps = load(&fixtures().join("alloc/steps.safetensors"))?;
    let patterns = alloc_expected()?["rank_pattern_after_step"]
        .as_array()
        .context("rank_pattern_after_step")?
        .clone();
    Ok((steps, patterns))
}

/// The fixture model with PEFT's adapter as it was before training.
fn alloc_model() -> Result<Llama> {
    let mut model = Llama::build(&load(&fixtures().join("base.safetensors"))?)?;
    model.load_adapter(fixtures().join("alloc/adapter"))?;
    Ok(model)
}

/// The trainable variables by the fixture's names (`model.layers.0.self_attn.q_proj.lora_A`).
fn recorded_vars(model: &Llama) -> Vec<(String, Var)> {
    model
        .named_trainable_vars()
        .into_iter()
        .map(|(n, v)| (n.trim_start_matches("base_model.model.").to_string(), v))
        .collect()
}

/// Sets every trainable variable to its value recorded as `<step>.<key>.param`.
fn set_recorded(vars: &[(String, Var)], steps: &Weights, step: usize) -> Result<()> {
    for (name, var) in vars {
        var.set(&tensor(steps, &format!("{step}.{name}.param"))?)?;
    }
    Ok(())
}

/// Step `step` of PEFT's run: the factors as PEFT's allocator saw them, then
/// `update_and_allocate` with PEFT's gradients.
fn replay_step(
    allocator: &mut RankAllocator,
    vars: &[(String, Var)],
    steps: &Weights,
    step: usize,
) -> Result<()> {
    set_recorded(vars, steps, step)?;
    let grads: HashMap<_, Tensor> = vars
        .iter()
        .map(|(name, var)| {
            let grad = tensor(steps, &format!("{step}.{name}.grad"))?;
            Ok((var.as_tensor().id(), grad))
        })
        .collect::<Result<_>>()?;
    allocator.update_and_allocate(step as u64, |v| grads.get(&v.as_tensor().id()).cloned())?;
    Ok(())
}

#[test]
fn rank_allocation_replays_peft_s_masks_and_regulariser() -> Result<()> {
    let (steps, patterns) = alloc_run()?;
    let model = alloc_model()?;
    let vars = recorded_vars(&model);
    ensure!(vars.len() == 18, "{} variables", vars.len());
    let mut allocator = RankAllocator::new(&model)?;
    let state = tempfile::tempdir()?;
    let mut worst_penalty = 0f64;
    for step in 1..=patterns.len() {
        // PEFT's loss at this step, with and without the regulariser, on the factors before it
        // (A and B: masking never changes them).
        if step > 1 {
            set_recorded(&vars, &steps, step - 1)?;
        }
        let scalar = |k: &str| -> Result<f64> { Ok(f64::from(f32s(&tensor(&steps, k)?)?[0])) };
        let peft_penalty = scalar(&format!("{step}.loss"))? - scalar(&format!("{step}.lm_loss"))?;
        let ours = f64::from(allocator.orth_penalty()?.to_scalar::<f32>()?);
        let err = (ours - peft_penalty).abs();
        ensure!(
            err <= 1e-5 * peft_penalty.abs().max(1.0),
            "step {step}: orthogonal penalty {ours} vs PEFT's {peft_penalty}"
        );
        worst_penalty = worst_penalty.max(err);

        replay_step(&mut allocator, &vars, &steps, step)?;
        for (name, var) in vars.iter().filter(|(n, _)| n.ends_with("lora_E")) {
            assert_bit_equal(
                &format!("step {step}: {name}"),
                var.as_tensor(),
                &tensor(&steps, &format!("{step}.{name}.after"))?,
            )?;
        }
        let ours = serde_json::to_value(allocator.rank_pattern())?;
        ensure!(
            ours == patterns[step - 1],
            "step {step}: rank pattern {ours} but PEFT's {}",
            patterns[step - 1]
        );
        // Half way, continue from a saved state in a new allocator: the rest must not change.
        if step == 5 {
            allocator.save_state(state.path())?;
            allocator = RankAllocator::new(&model)?;
            allocator.load_state(state.path())?;
        }
    }
    println!(
        "{} steps: E and rank patterns equal to PEFT's, orthogonal penalty within {worst_penalty:.1e}",
        patterns.len()
    );
    Ok(())
}

#[test]
fn budget_schedule_is_peft_s() -> Result<()> {
    let expected = alloc_expected()?;
    for table in expected["budget_schedules"]
        .as_array()
        .context("budget_schedules")?
    {
        let n = |k: &str| table[k].as_u64().with_context(|| k.to_string());
        let schedule = AdaLoraSchedule {
            target_r: n("target_r")? as usize,
            tinit: n("tinit")? as usize,
            tfinal: n("tfinal")? as usize,
            delta_t: n("deltaT")? as usize,
            total_step: Some(n("total_step")? as usize),
            ..AdaLoraSchedule::default()
        };
        let (init, target) = (
            n("init_bgt")? as usize,
            (n("target_r")? * n("n_modules")?) as usize,
        );
        let ours: Vec<(usize, bool)> = (0..=n("total_step")? + 1)
            .map(|step| RankAllocator::budget_at(&schedule, init, target, step))
            .collect();
        let budgets: Vec<usize> = serde_json::from_value(table["budget"].clone())?;
        let masks: Vec<bool> = serde_json::from_value(table["mask"].clone())?;
        let peft: Vec<(usize, bool)> = budgets.into_iter().zip(masks).collect();
        ensure!(ours == peft, "{schedule:?}: ours {ours:?}\nPEFT's {peft:?}");
    }
    Ok(())
}

#[test]
fn pruned_adapters_save_peft_s_rank_pattern_and_reload() -> Result<()> {
    let (steps, patterns) = alloc_run()?;
    let last = patterns.len();
    let mut model = alloc_model()?;
    let vars = recorded_vars(&model);
    let mut allocator = RankAllocator::new(&model)?;
    for step in 1..=last {
        replay_step(&mut allocator, &vars, &steps, step)?;
    }
    let x = tensor(&load(&fixtures().join("plain/io.safetensors"))?, "input")?;
    let y = model.forward(&x)?;
    allocator.prune(&mut model)?;
    assert_close("pruned output", &model.forward(&x)?, &y, 1e-6)?;
    let dir = tempfile::tempdir()?;
    model.save_adapter(dir.path())?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("adapter_config.json"),
    )?)?;
    ensure!(config["peft_type"] == "ADALORA" && config["init_r"] == 4);
    ensure!(
        config["rank_pattern"] == patterns[last - 1],
        "saved rank pattern {} but PEFT's {}",
        config["rank_pattern"],
        patterns[last - 1]
    );
    let saved = load(&dir.path().join("adapter_model.safetensors"))?;
    let e = tensor(
        &saved,
        "base_model.model.model.layers.0.mlp.down_proj.lora_E",
    )?;
    ensure!(e.dims() == [2, 1], "lora_E {:?}", e.dims());
    let mut again = alloc_model()?;
    again.load_adapter(dir.path())?;
    assert_close("reloaded output", &again.forward(&x)?, &y, 1e-6)?;
    Ok(())
}
