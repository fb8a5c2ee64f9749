//! LoRA over a quantized base (QLoRA): a GGUF loaded with `Precision::Quantized` keeps its
//! projections as stored and gives the logits of transformers' reference, with and without a
//! PEFT adapter; adapters carry the same base fingerprints as on the f32 load; training
//! gradients are the f32 base's; merging is refused and leaves the model as it was; the CLI
//! takes `--dtype quantized` (the default of `lora train` on a GGUF) and refuses it with
//! `--merge` and `--full`.
//!
//! References: transformers and PEFT on the tiny GGUF (llama.cpp's q/k row permutation, a Q8_0
//! tensor; `scripts/llm_fixtures.py`), SmolLM2-135M-Instruct's Q4_1 GGUF when present.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use lora::models::llama::{load_llama, LlamaForCausalLM, Precision};
use lora::{LayerError, LoraModel, LoraModelExt, ModulePath};

const LORA: &str = env!("CARGO_BIN_EXE_lora");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/tiny-llama-gguf")
}

fn tiny() -> PathBuf {
    fixtures().join("tiny-llama.gguf")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("io.safetensors"), &Device::Cpu).unwrap()
}

fn logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    let ids = ids.to_dtype(DType::U32).unwrap();
    model.forward(&ids, &mut model.new_cache()).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// As `lora-models/tests/llama.rs`: chains of sums of <= 256 f32 products in another order than
/// PyTorch's (the quantized base computes with the weights dequantized exactly as transformers
/// dequantizes them), a few 1e-6 relative per layer.
const TINY_RTOL: f32 = 2e-5;

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let (d, s) = (common::max_abs_diff(got, want), max_abs(want));
    println!(
        "tiny GGUF, quantized base, {what}: max |ours - reference| {d:.3e} (max |logit| {s:.2})"
    );
    assert!(d <= TINY_RTOL * s.max(1.0), "{what}: {d} vs scale {s}");
}

/// Every LoRA layer's path and base fingerprint.
fn fingerprints(model: &LlamaForCausalLM) -> Vec<(String, String)> {
    let mut out = Vec::new();
    model
        .visit_lora_layers(&mut ModulePath::new(), &mut |p, layer, _| {
            out.push((p.to_string(), layer.base_fingerprint().unwrap().to_string()));
            Ok(())
        })
        .unwrap();
    out
}

#[test]
fn a_quantized_gguf_gives_transformers_logits_with_and_without_a_peft_adapter() {
    let io = io();
    let ids = &io["input_ids"];
    let mut model = load_llama(&tiny(), Precision::Quantized, &Device::Cpu).unwrap();
    // The projections are quantized (attn_q of layer 0 is Q8_0 and permuted in the file).
    let q = &model.model.layers[0].self_attn.q_proj;
    assert_eq!(
        q.quantized_weight().map(|w| w.ggml_dtype()),
        Some(candle_core::quantized::GgmlDType::Q8_0)
    );
    assert!(matches!(q.weight(), Err(LayerError::Quantized(_))));
    check("base", &logits(&model, ids), &io["logits"]);

    // The same fingerprints as on the f32 load: those of the file's bytes.
    let f32_model = load_llama(&tiny(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(fingerprints(&model), fingerprints(&f32_model));

    model.load_adapter(fixtures().join("adapter")).unwrap();
    let with_adapter = logits(&model, ids);
    check("PEFT adapter", &with_adapter, &io["logits_adapter"]);

    // Merging is refused, naming the reason, and the model is left as it was.
    let err = model.merge().unwrap_err().to_string();
    assert!(
        err.contains("quantized") && err.contains("lora merge"),
        "{err}"
    );
    assert!(!model.is_merged());
    assert_eq!(
        common::bits(&logits(&model, ids)),
        common::bits(&with_adapter)
    );
}

#[test]
fn training_on_a_quantized_base_gives_the_f32_bases_gradients() {
    let io = io();
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let mut grads = Vec::new();
    for precision in [Precision::Quantized, Precision::Float(DType::F32)] {
        let mut model = load_llama(&tiny(), precision, &Device::Cpu).unwrap();
        model.load_adapter(fixtures().join("adapter")).unwrap();
        model.set_training(true);
        let vars = model.trainable_vars();
        let logits = model.forward(&ids, &mut model.new_cache()).unwrap();
        // Next-token cross-entropy over the sequence.
        let (b, t, v) = logits.dims3().unwrap();
        let pred = logits
            .narrow(1, 0, t - 1)
            .unwrap()
            .reshape((b * (t - 1), v))
            .unwrap();
        let target = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
        let loss = lora::candle_nn::loss::cross_entropy(&pred, &target).unwrap();
        let store = loss.backward().unwrap();
        grads.push(
            vars.iter()
                .map(|v| store.get(v.as_tensor()).unwrap().clone())
                .collect::<Vec<_>>(),
        );
        // No base weight trains: only the adapters' factors are variables.
        let base = model.model.layers[0].mlp.down_proj.clone();
        assert!(base.quantized_weight().is_some() == (precision == Precision::Quantized));
    }
    assert!(!grads[0].is_empty());
    for (gq, gf) in grads[0].iter().zip(&grads[1]) {
        let (d, s) = (common::max_abs_diff(gq, gf), max_abs(gf));
        assert!(d <= 1e-4 * s.max(1e-6), "{d} vs {s}");
    }
}

#[test]
fn decoding_a_smollm2_q4_1_base_kept_quantized_gives_the_f32_tokens() {
    let Some(path) = lora::models::cache::smollm2_or_skip("QLoRA decoding").unwrap() else {
        return;
    };
    use lora::models::generate::GenerateOptions;
    use lora::models::{Message, Pretrained};
    let mut texts = Vec::new();
    let mut held = Vec::new();
    for precision in [Precision::Quantized, Precision::Float(DType::F32)] {
        let p = Pretrained::load(&path, precision, &Device::Cpu).unwrap();
        let prompt = p
            .chat_prompt(&[Message::new("user", "What is the capital of France?")])
            .unwrap();
        let options = GenerateOptions {
            max_new_tokens: 12,
            ..GenerateOptions::default()
        };
        texts.push(p.generate_text(&prompt, &options, |_| Ok(())).unwrap());
        // What the projections hold: Q4_1 blocks (5 bits a weight) against f32.
        let layer = &p.model.model.layers[0].mlp.up_proj;
        held.push(
            layer
                .quantized_weight()
                .map(|q| q.storage_size_in_bytes())
                .unwrap_or_else(|| layer.weight().unwrap().elem_count() * 4),
        );
    }
    assert_eq!(texts[0], texts[1]);
    assert!(texts[0].contains("Paris"), "{}", texts[0]);
    assert!(held[0] * 6 <= held[1], "{held:?}");
}

/// `lora train` on the tiny GGUF with `data` (JSONL text) into `dir/name`, plus `flags`.
fn train_tiny(
    dir: &Path,
    name: &str,
    data: &str,
    flags: &[&str],
) -> (PathBuf, std::process::Output) {
    let data_path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&data_path, data).unwrap();
    let out = dir.join(name);
    let o = Command::new(LORA)
        .arg("train")
        .arg("--model")
        .arg(tiny())
        .arg("--data")
        .arg(&data_path)
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .args(flags)
        .output()
        .unwrap();
    (out, o)
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(LORA).args(args).output().unwrap()
}

#[test]
fn the_cli_trains_on_a_quantized_gguf_by_default_and_refuses_merge_and_full_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = "{\"prompt\": \"a b\", \"completion\": \" c d\"}\n{\"prompt\": \"e f\", \"completion\": \" g\"}\n";
    let flags = [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--targets",
        "all-linear",
    ];
    let (out, o) = train_tiny(dir.path(), "adapter", data, &flags);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("base quantized as stored"), "{err}");
    let out_s = out.to_str().unwrap();
    // The adapter loads onto the f32 model and onto the quantized one, and generates.
    for dtype in ["f32", "quantized"] {
        let g = tiny_generate(&["--dtype", dtype, "--adapter", out_s]);
        assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    }
    let merge = tiny_generate(&["--dtype", "quantized", "--adapter", out_s, "--merge"]);
    let err = String::from_utf8_lossy(&merge.stderr);
    assert!(
        !merge.status.success() && err.contains("--merge needs dense weights"),
        "{err}"
    );
    let (full_out, full) = train_tiny(
        dir.path(),
        "full",
        data,
        &["--full", "--dtype", "quantized"],
    );
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(!full.status.success() && err.contains("--full"), "{err}");
    assert!(!full_out.exists());
    // A Hugging Face directory has nothing quantized to keep.
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/tiny-chat");
    let o = run(&[
        "generate",
        "--model",
        hf.to_str().unwrap(),
        "--dtype",
        "quantized",
        "--prompt",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("GGUF"), "{err}");
}

/// `lora generate --model tiny.gguf --raw --prompt "a b" --max-new-tokens 12 FLAGS`.
fn tiny_generate(flags: &[&str]) -> std::process::Output {
    Command::new(LORA)
        .arg("generate")
        .arg("--model")
        .arg(tiny())
        .args(["--raw", "--prompt", "a b", "--max-new-tokens", "12"])
        .args(flags)
        .output()
        .unwrap()
}

/// [`tiny_generate`]'s completion with `--dtype quantized` (stdout without the final newline).
fn generate_quantized(adapter: Option<&Path>) -> String {
    let mut flags = vec!["--dtype", "quantized"];
    let adapter = adapter.map(|a| a.to_str().unwrap());
    if let Some(a) = adapter {
        flags.extend(["--adapter", a]);
    }
    let o = tiny_generate(&flags);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.pop(), Some('\n'));
    text
}

#[test]
fn lora_serve_on_a_quantized_base_completes_as_generate_in_a_mixed_batch() {
    use common::server::Server;
    let dir = tempfile::tempdir().unwrap();
    let data = "{\"prompt\": \"a b\", \"completion\": \" c d e f\"}\n";
    let flags = ["--steps", "3", "--lr", "0.2", "--targets", "all-linear"];
    let (adapter, o) = train_tiny(dir.path(), "a", data, &flags);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = format!("a={}", adapter.display());
    let server = std::sync::Arc::new(Server::start(
        &tiny(),
        &["--dtype", "quantized", "--adapter", &spec],
    ));
    let cases = [("a", Some(adapter.as_path())), ("tiny-llama", None)];
    let handles: Vec<_> = cases
        .iter()
        .map(|&(model, _)| {
            let server = std::sync::Arc::clone(&server);
            std::thread::spawn(move || {
                let body = serde_json::json!({"model": model, "prompt": "a b", "max_tokens": 12, "temperature": 0});
                server.post("/v1/completions", &body)
            })
        })
        .collect();
    let mut texts = Vec::new();
    for (h, &(model, path)) in handles.into_iter().zip(&cases) {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(text, generate_quantized(path), "model {model}");
        texts.push(text);
    }
    assert_ne!(texts[0], texts[1], "the adapter changes the completion");
}
