//! `lora merge` into GGUF files: the merged file loads and gives the logits of the unmerged base
//! + adapter (exactly up to float rounding for `--type f32`, within what the measured
//! requantization error explains for quantized types), every other tensor and all metadata are
//! copied byte for byte, DoRA adapters merge, K-quant blocks read as the `gguf` Python package
//! reads them, and bad input is a named error that leaves no output behind.
//!
//! References: PEFT's merged logits for the tiny GGUF (`tests/fixtures/llm/tiny-llama-gguf`,
//! `scripts/llm_fixtures.py`), the `gguf` package's quantizer and dequantizer
//! (`tests/fixtures/gguf`, `scripts/gguf_fixtures.py`), SmolLM2-135M-Instruct's Q4_1 GGUF when
//! present (`scripts/fetch-smollm2.sh`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use lora::models::gguf::{merge_gguf, GgufMergeOptions, GgufMergeReport, TargetType};
use lora::models::llama::{load_llama, LlamaForCausalLM};
use lora::models::ModelError;
use lora::LoraModelExt;

const LORA: &str = env!("CARGO_BIN_EXE_lora");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("llm/tiny-llama-gguf/tiny-llama.gguf")
}

fn tiny_io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("llm/tiny-llama-gguf/io.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    let ids = ids.to_dtype(DType::U32).unwrap();
    model.forward(&ids, &mut model.new_cache()).unwrap()
}

fn norm(t: &Tensor) -> f64 {
    f64::from(
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
    .sqrt()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn merge(base: &Path, adapter: &Path, out: &Path, target: &str) -> GgufMergeReport {
    let options = GgufMergeOptions {
        target: target.parse().unwrap(),
        ..Default::default()
    };
    merge_gguf(base, adapter, out, &options, &mut |_, _| {}).unwrap()
}

fn read_gguf(path: &Path) -> (std::fs::File, Content) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    (f, c)
}

fn raw(path: &Path, c: &Content, name: &str) -> Vec<u8> {
    let info = &c.tensor_infos[name];
    let n = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
    let start = (c.tensor_data_offset + info.offset) as usize;
    std::fs::read(path).unwrap()[start..start + n].to_vec()
}

/// `sqrt(sum_t ||s B_t A_t||_F^2)` over the adapter's modules: the size of the merged deltas.
fn delta_norm(adapter: &Path) -> f64 {
    let file = lora::peft::AdapterFile::read(adapter).unwrap();
    let mut sum = 0.0;
    for (module, f) in &file.factors {
        let d =
            f.b.to_dtype(DType::F32)
                .unwrap()
                .matmul(&f.a.to_dtype(DType::F32).unwrap())
                .unwrap();
        sum += (norm(&d) * file.config.scaling_for(module)).powi(2);
    }
    sum.sqrt()
}

/// How far a requantized merge may be from base + adapter.
///
/// Reasoning: with an adapter of random factors, the merged delta `D_t` of each tensor and its
/// requantization error `E_t` are both perturbations of the weight with no preferred direction,
/// and a random perturbation `M` of a linear layer changes its output by `||M x|| ~ ||M||_F
/// ||x|| / sqrt(in)` whatever its rank. To first order the logits then move in proportion to the
/// Frobenius norm of the perturbation: `||dlogits(E)|| ~ (||E||_F / ||D||_F) ||dlogits(D)||`,
/// with `||E||_F` measured by the merge (`sum_sq_error`) and `dlogits(D)` = the adapter's effect
/// (merged f32 minus base). A factor 3 covers the directions not being exactly isotropic
/// (quantization errors follow the blocks) and second-order terms; the bound is on the 2-norm of
/// the logit difference over all positions.
fn requant_bound(report: &GgufMergeReport, adapter: &Path, adapter_effect: f64) -> f64 {
    let err: f64 = report
        .merged
        .iter()
        .map(|t| t.sum_sq_error)
        .sum::<f64>()
        .sqrt();
    3.0 * err / delta_norm(adapter) * adapter_effect
}

#[test]
fn tiny_gguf_merge_gives_peft_merged_logits_and_copies_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("llm/tiny-llama-gguf/adapter");
    let io = tiny_io();
    let ids = &io["input_ids"];

    let f32_out = dir.path().join("merged-f32.gguf");
    let report = merge(&tiny(), &adapter, &f32_out, "f32");
    assert_eq!(report.merged.len(), 12, "q, k, v, o of 3 layers");
    assert!(report.merged.iter().all(|t| t.max_rel_error == 0.0));
    let merged = load_llama(&f32_out, DType::F32, &Device::Cpu).unwrap();
    let got = logits(&merged, ids);
    let want = &io["logits_merged"];
    let d = common::max_abs_diff(&got, want);
    let scale = max_abs(want);
    println!(
        "tiny f32 merge vs PEFT merge_and_unload: max |diff| {d:.3e} (max |logit| {scale:.2})"
    );
    // As tests in lora-models/tests/llama.rs: sums of <= 256 products in another order.
    assert!(d <= 2e-5 * scale.max(1.0), "{d} vs {scale}");

    // Metadata and every tensor the adapter does not touch are copied byte for byte.
    let (_, base_c) = read_gguf(&tiny());
    let (_, out_c) = read_gguf(&f32_out);
    assert_eq!(
        format!("{:?}", sorted(&base_c.metadata)),
        format!("{:?}", sorted(&out_c.metadata))
    );
    let adapted: Vec<&str> = report.merged.iter().map(|t| t.name.as_str()).collect();
    for name in base_c.tensor_infos.keys() {
        let out_info = &out_c.tensor_infos[name];
        if adapted.contains(&name.as_str()) {
            assert_eq!(out_info.ggml_dtype, candle_core::quantized::GgmlDType::F32);
        } else {
            assert_eq!(
                raw(&tiny(), &base_c, name),
                raw(&f32_out, &out_c, name),
                "{name}"
            );
        }
    }

    // `same` keeps each tensor's type (Q8_0, F16, F32 in the fixture), within the bound the
    // measured requantization error gives.
    let same_out = dir.path().join("merged-same.gguf");
    let same = merge(&tiny(), &adapter, &same_out, "same");
    let (_, same_c) = read_gguf(&same_out);
    for t in &same.merged {
        assert_eq!(t.written, t.stored, "{}", t.name);
        assert_eq!(same_c.tensor_infos[&t.name].ggml_dtype, t.stored);
    }
    let base = load_llama(&tiny(), DType::F32, &Device::Cpu).unwrap();
    let effect = norm(&(&got - logits(&base, ids)).unwrap());
    let same_model = load_llama(&same_out, DType::F32, &Device::Cpu).unwrap();
    let diff = norm(&(logits(&same_model, ids) - &got).unwrap());
    let bound = requant_bound(&same, &adapter, effect);
    println!(
        "tiny same merge: ||dlogits|| {diff:.3e}, bound {bound:.3e} (adapter effect {effect:.3e}, max rel. requant error {:.2e})",
        same.max_rel_error()
    );
    assert!(diff <= bound, "{diff} > {bound}");
}

fn sorted<V: std::fmt::Debug>(m: &HashMap<String, V>) -> Vec<(String, String)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect();
    v.sort();
    v
}

/// The tiny fixture's adapter turned into a DoRA adapter: the same factors plus a magnitude per
/// output feature.
fn tiny_dora(dir: &Path) -> PathBuf {
    let src = fixtures().join("llm/tiny-llama-gguf/adapter");
    let mut tensors =
        candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let keys: Vec<String> = tensors.keys().cloned().collect();
    for (i, key) in keys.iter().enumerate() {
        if let Some(stem) = key.strip_suffix(".lora_B.weight") {
            let out = tensors[key].dim(0).unwrap();
            // Positive magnitudes around the rows' norms (~0.8 for these weights).
            let m = (common::tensor(100 + i as u64, &[out], 0.3).affine(1.0, 0.8)).unwrap();
            tensors.insert(format!("{stem}.lora_magnitude_vector"), m);
        }
    }
    let out = dir.join("dora");
    std::fs::create_dir_all(&out).unwrap();
    candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
    config["use_dora"] = serde_json::Value::Bool(true);
    std::fs::write(out.join("adapter_config.json"), config.to_string()).unwrap();
    out
}

#[test]
fn dora_adapters_merge_into_gguf_like_the_unmerged_model() {
    let dir = tempfile::tempdir().unwrap();
    let dora = tiny_dora(dir.path());
    let io = tiny_io();
    let ids = &io["input_ids"];
    let mut model = load_llama(&tiny(), DType::F32, &Device::Cpu).unwrap();
    model.load_adapter(&dora).unwrap();
    let want = logits(&model, ids);
    let out = dir.path().join("merged.gguf");
    merge(&tiny(), &dora, &out, "f32");
    let got = logits(&load_llama(&out, DType::F32, &Device::Cpu).unwrap(), ids);
    let (d, scale) = (common::max_abs_diff(&got, &want), max_abs(&want));
    println!("tiny DoRA f32 merge vs unmerged: max |diff| {d:.3e} (max |logit| {scale:.2})");
    assert!(d <= 2e-5 * scale.max(1.0), "{d} vs {scale}");
    // DoRA changes the logits beyond what the plain LoRA merge gives.
    assert!(common::max_abs_diff(&got, &io["logits_merged"]) > 100.0 * d);
}
