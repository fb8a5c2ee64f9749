//! The Llama-family model against transformers and PEFT: tiny random checkpoints (Llama with
//! Llama-3 RoPE scaling, tied Llama, Qwen2 with q/k/v bias, a GGUF with llama.cpp's q/k
//! permutation and a Q8_0 tensor) with and without PEFT adapters, and SmolLM2-135M-Instruct's
//! GGUF. References: `scripts/llm_fixtures.py`, fixtures in `tests/fixtures/llm/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_models::generate::{generate, GenerateOptions};
use lora_models::llama::{load_llama, LlamaForCausalLM};
use lora_runtime::LoraModelExt;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm")
}

fn io(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(case).join("io.safetensors"), &Device::Cpu)
        .unwrap()
}

/// `max |a - b|` and `max |b|`.
fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar().unwrap(), s.to_scalar().unwrap())
}

/// The logits of `ids` (i64 `[b, t]`) in one pass.
fn logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    let ids = ids.to_dtype(DType::U32).unwrap();
    model.forward(&ids, &mut model.new_cache()).unwrap()
}

/// f32 logits of a few layers of width <= 256: each value is a chain of sums of <= 256 products
/// computed in another order than PyTorch's, so a relative error of a few 1e-6 per layer;
/// 2e-5 of the largest logit covers every case here with margin.
const TINY_RTOL: f32 = 2e-5;

fn check(case: &str, what: &str, got: &Tensor, want: &Tensor) {
    let (d, s) = diff(got, want);
    println!("{case} {what}: max |ours - transformers| = {d:.3e} (max |logit| {s:.2})");
    assert!(
        d <= TINY_RTOL * s.max(1.0),
        "{case} {what}: {d} vs scale {s}"
    );
}

#[test]
fn tiny_checkpoints_match_transformers_with_and_without_peft_adapters() {
    for case in [
        "tiny-llama",
        "tiny-llama-tied",
        "tiny-qwen2",
        "tiny-llama-gguf",
    ] {
        let dir = fixtures().join(case);
        let path = if case.ends_with("gguf") {
            dir.join("tiny-llama.gguf")
        } else {
            dir.clone()
        };
        let mut model = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
        let io = io(case);
        let ids = &io["input_ids"];
        check(case, "base", &logits(&model, ids), &io["logits"]);
        if !io.contains_key("logits_adapter") {
            continue;
        }
        model.load_adapter(dir.join("adapter")).unwrap();
        check(case, "adapter", &logits(&model, ids), &io["logits_adapter"]);
        model.merge().unwrap();
        check(case, "merged", &logits(&model, ids), &io["logits_merged"]);
        model.unmerge().unwrap();
        model.set_active_adapter(None).unwrap();
        check(
            case,
            "adapter inactive",
            &logits(&model, ids),
            &io["logits"],
        );
    }
}

#[test]
fn the_kv_cache_gives_the_logits_of_a_full_pass() {
    let model = load_llama(&fixtures().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let ids = io("tiny-llama")["input_ids"].to_dtype(DType::U32).unwrap();
    let full = model.forward(&ids, &mut model.new_cache()).unwrap();
    let mut cache = model.new_cache();
    let mut steps = vec![model
        .forward(&ids.narrow(1, 0, 4).unwrap(), &mut cache)
        .unwrap()];
    for t in 4..ids.dim(1).unwrap() {
        steps.push(
            model
                .forward(&ids.narrow(1, t, 1).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let incremental = Tensor::cat(&steps, 1).unwrap();
    let (d, s) = diff(&incremental, &full);
    assert!(d <= 1e-5 * s.max(1.0), "{d}");
    assert_eq!(cache.len(), ids.dim(1).unwrap());
}

fn smollm2_reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("smollm2.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Our last-position logits at the reference's top-k ids: the largest difference.
fn topk_diff(model: &LlamaForCausalLM, prompt: &[u32], topk: &Value) -> f32 {
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let last: Vec<f32> = model
        .forward_last(&input, &mut model.new_cache())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    topk.as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            let (id, logit) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            (last[id] - logit as f32).abs()
        })
        .fold(0f32, f32::max)
}

/// The last-position logits of SmolLM2 (30 layers, width 576 and 1536, logits up to ~30): f32
/// sums in another order than PyTorch's give differences of a few 1e-4 at most.
const SMOLLM2_ATOL: f32 = 2e-3;

/// Greedy continuations equal transformers', or first diverge where the reference's top-2
/// margin is below 1e-3 (two near-tied tokens that rounding may swap).
fn check_greedy(case: &str, got: &[u32], want: &[u32], margins: &[f64]) {
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            assert!(
                margins.get(step).is_some_and(|m| *m < 1e-3),
                "{case}: step {step}: {g} vs {w} (reference margin {:?})",
                margins.get(step)
            );
            println!(
                "{case}: diverged at step {step}, reference margin {:?}",
                margins[step]
            );
            return;
        }
    }
    assert!(
        got.len() >= want.len().min(32),
        "{case}: {} tokens",
        got.len()
    );
}

#[test]
fn smollm2_matches_transformers_logits_and_greedy_continuations() {
    let Some(path) = lora_models::cache::smollm2_or_skip("smollm2").unwrap() else {
        return;
    };
    let model = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let reference = smollm2_reference();
    let eos = reference["eos_token_id"].as_u64().unwrap() as u32;
    let mut worst = 0f32;
    for (i, case) in reference["chat_cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let prompt = ids(&case["prompt_ids"]);
        let d = topk_diff(&model, &prompt, &case["last_topk"]);
        worst = worst.max(d);
        assert!(d <= SMOLLM2_ATOL, "case {i}: {d}");
        let want = ids(&case["greedy_ids"]);
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let options = GenerateOptions {
            max_new_tokens: want.len(),
            stop_tokens: vec![eos],
            ..GenerateOptions::default()
        };
        let mut got = generate(&model, &prompt, &options, |_| Ok(()))
            .unwrap()
            .tokens;
        if want.last() == Some(&eos) {
            got.push(eos);
        }
        check_greedy(&format!("case {i}"), &got, &want, &margins);
    }
    println!("smollm2: max |ours - transformers| over top-20 last-position logits: {worst:.3e}");
}

#[test]
fn a_peft_adapter_made_on_transformers_smollm2_gives_peft_outputs() {
    let Some(path) = lora_models::cache::smollm2_or_skip("smollm2 adapter").unwrap() else {
        return;
    };
    let mut model = load_llama(&path, DType::F32, &Device::Cpu).unwrap();
    let dir = fixtures().join("smollm2-adapter");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let prompt = ids(&reference["prompt_ids"]);
    let d = topk_diff(&model, &prompt, &reference["base_last_topk"]);
    assert!(d <= SMOLLM2_ATOL, "base: {d}");
    model.load_adapter(&dir).unwrap();
    let d = topk_diff(&model, &prompt, &reference["adapter_last_topk"]);
    println!("adapter: {d:.3e}");
    assert!(d <= SMOLLM2_ATOL, "adapter: {d}");
    model.merge().unwrap();
    let d = topk_diff(&model, &prompt, &reference["merged_last_topk"]);
    println!("merged: {d:.3e}");
    assert!(d <= SMOLLM2_ATOL, "merged: {d}");
}

/// Flips one byte of the tensor data of `name` in a copy of the GGUF at `src`.
fn gguf_with_changed_tensor(src: &Path, name: &str, dst: &Path) {
    let mut file = std::fs::File::open(src).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let info = &content.tensor_infos[name];
    let at = (content.tensor_data_offset + info.offset) as usize + 3;
    let mut bytes = std::fs::read(src).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn adapters_on_gguf_bases_record_the_stored_tensors_whatever_the_dtype() {
    let gguf = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
    let mut model = load_llama(&gguf, DType::F32, &Device::Cpu).unwrap();
    let config = lora_runtime::LoraConfig::from_json(
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )
    .unwrap();
    model
        .init_adapter_with(
            &candle_nn::VarMap::new(),
            &lora_runtime::InitOptions::default().with_peft_config(config),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path()).unwrap();
    let file = lora_runtime::peft::AdapterFile::read(dir.path()).unwrap();
    // blk.0.attn_q is stored as Q8_0 and blk.1.attn_v as F16 in the fixture.
    let q = &file.base_fingerprints["model.layers.0.self_attn.q_proj"];
    let v = &file.base_fingerprints["model.layers.1.self_attn.v_proj"];
    assert_eq!((q.dtype.as_str(), v.dtype.as_str()), ("q8_0", "f16"));

    // The same file loaded in another dtype accepts the adapter ...
    let mut half = load_llama(&gguf, DType::F16, &Device::Cpu).unwrap();
    half.load_adapter(dir.path()).unwrap();
    // ... another file with a changed q tensor refuses it, naming the module.
    let other = dir.path().join("other.gguf");
    gguf_with_changed_tensor(&gguf, "blk.0.attn_q.weight", &other);
    let mut changed = load_llama(&other, DType::F32, &Device::Cpu).unwrap();
    let err = changed.load_adapter(dir.path()).unwrap_err();
    assert!(
        matches!(&err, lora_runtime::Error::BaseMismatch { module, .. } if module == "model.layers.0.self_attn.q_proj"),
        "{err}"
    );
    assert!(changed.adapters().is_empty());
}

#[test]
fn bad_checkpoints_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A truncated GGUF: the error names the file and the tensor.
    let gguf = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_llama(&cut, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("tensor `"),
        "{err}"
    );
    // Not a model at all.
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"hello").unwrap();
    let err = load_llama(&junk, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.bin") && err.contains("neither a GGUF"),
        "{err}"
    );
    // Another architecture.
    let hf = dir.path().join("gpt2");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(
        hf.join("config.json"),
        r#"{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}"#,
    )
    .unwrap();
    let err = load_llama(&hf, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("`model_type`"),
        "{err}"
    );
    // A directory whose weights lack a tensor.
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    let src = fixtures().join("tiny-llama-tied");
    std::fs::copy(src.join("config.json"), partial.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&tensors, partial.join("model.safetensors")).unwrap();
    let err = load_llama(&partial, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    // An adapter for another model: shape mismatch named by the file and tensor.
    let mut model = load_llama(&fixtures().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .load_adapter(fixtures().join("smollm2-adapter"))
        .unwrap_err();
    assert!(
        matches!(err, lora_runtime::Error::BadTensor { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("adapter_model.safetensors")
            && text.contains("lora_A")
            && text.contains("does not fit"),
        "{text}"
    );
    assert!(model.adapters().is_empty());
}

#[test]
fn lora_training_reaches_every_layer_through_norms_and_softmax() {
    use candle_nn::{Optimizer, ParamsAdamW};
    let mut model = load_llama(&fixtures().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let config = lora_runtime::LoraConfig::from_json(
        r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#,
    )
    .unwrap();
    let varmap = candle_nn::VarMap::new();
    model
        .init_adapter_with(
            &varmap,
            &lora_runtime::InitOptions::default().with_peft_config(config),
        )
        .unwrap();
    model.set_training(true);
    let ids = io("tiny-llama")["input_ids"].to_dtype(DType::U32).unwrap();
    let t = ids.dim(1).unwrap();
    let (inputs, targets) = (
        ids.narrow(1, 0, t - 1).unwrap(),
        ids.narrow(1, 1, t - 1).unwrap(),
    );
    let loss_of = |model: &LlamaForCausalLM| {
        let logits = model.forward(&inputs, &mut model.new_cache()).unwrap();
        candle_nn::loss::cross_entropy(
            &logits.flatten_to(1).unwrap(),
            &targets.flatten_all().unwrap(),
        )
        .unwrap()
    };
    // B starts at zero, so every B gets a gradient (A's is zero): the first layer's included,
    // which the gradient reaches only through the norms and softmax of the layers above it.
    let loss = loss_of(&model);
    let grads = loss.backward().unwrap();
    let layers = model.lora_layers();
    let adapted: Vec<_> = layers
        .iter()
        .filter(|(_, l, _)| l.adapter().is_some())
        .collect();
    assert_eq!(
        (layers.len(), adapted.len()),
        (15, 14),
        "all-linear leaves lm_head out"
    );
    for (path, layer, _) in adapted {
        let b = layer.adapter().unwrap().b();
        let g = grads
            .get(b.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{path}: zero gradient");
    }
    let mut opt = candle_nn::AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..ParamsAdamW::default()
        },
    )
    .unwrap();
    let first: f32 = loss.to_scalar().unwrap();
    for _ in 0..20 {
        let loss = loss_of(&model);
        opt.backward_step(&loss).unwrap();
    }
    let last: f32 = loss_of(&model).to_scalar().unwrap();
    assert!(last < 0.5 * first, "{first} -> {last}");
}
