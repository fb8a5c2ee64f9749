//! `lora merge` into GGUF files and `lora export --format gguf`: the merged file loads and gives
//! the logits of the unmerged base with its adapter (exactly up to float rounding for `--type
//! f32`, within what the measured requantization error explains for quantized types), every
//! other tensor and all metadata are copied byte for byte, DoRA adapters merge, K-quant blocks read as the `gguf` Python package
//! reads them, bad input is a named error that leaves no output behind, and exported adapters
//! have llama.cpp's layout with PEFT's scaling of every module.
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

/// A copy of the tiny GGUF whose `general.architecture` is `arch` (tensors as stored).
fn tiny_as_arch(arch: &str, dst: &Path) {
    use candle_core::quantized::gguf_file::{write, Value};
    let (mut f, c) = read_gguf(&tiny());
    let mut meta: Vec<(String, Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in meta.iter_mut() {
        if k == "general.architecture" {
            *v = Value::String(arch.to_string());
        }
    }
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = c
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    let mut out = std::fs::File::create(dst).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

/// The files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_input_is_a_named_error_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("llm/tiny-llama-gguf/adapter");
    let out = dir.path().join("out.gguf");
    let fail = |base: &Path, adapter: &Path| -> String {
        let before = listing(dir.path());
        let err = merge_gguf(
            base,
            adapter,
            &out,
            &GgufMergeOptions::default(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(!out.exists());
        assert_eq!(
            listing(dir.path()),
            before,
            "a temporary file was left behind"
        );
        err.to_string()
    };

    // An unsupported type name lists the supported ones, in the library and in the CLI.
    let err = "q7_k".parse::<TargetType>().unwrap_err();
    assert!(
        err.contains("`q7_k`") && err.contains("q4_k") && err.contains("same"),
        "{err}"
    );
    let o = Command::new(LORA)
        .args(["merge", "--base"])
        .arg(tiny())
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .args(["--type", "iq4_nl"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("`iq4_nl`"),
        "{stderr}"
    );
    assert!(!out.exists());

    // Another architecture.
    let gpt2 = dir.path().join("gpt2.gguf");
    tiny_as_arch("gpt2", &gpt2);
    let err = fail(&gpt2, &adapter);
    assert!(
        err.contains("gpt2.gguf") && err.contains("general.architecture") && err.contains("`gpt2`"),
        "{err}"
    );

    // An adapter made for another model: the shapes do not fit.
    let err = fail(&tiny(), &fixtures().join("llm/smollm2-adapter"));
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("model.layers.0.self_attn.q_proj")
            && err.contains("tiny-llama.gguf"),
        "{err}"
    );

    // A truncated file names the tensor cut off.
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(tiny()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let err = fail(&cut, &adapter);
    assert!(
        err.contains("cut.gguf") && err.contains("tensor `") && err.contains("truncated"),
        "{err}"
    );

    // An existing output is left as it was when a merge fails.
    std::fs::write(&out, b"previous").unwrap();
    let err = merge_gguf(
        &cut,
        &adapter,
        &out,
        &GgufMergeOptions::default(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Tensor { .. }), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
}

/// A random LoRA adapter on all 7 projections of every SmolLM2 layer (r 8, alpha 16).
fn smollm2_adapter(dir: &Path) -> PathBuf {
    let modules = [
        ("self_attn.q_proj", 576, 576),
        ("self_attn.k_proj", 192, 576),
        ("self_attn.v_proj", 192, 576),
        ("self_attn.o_proj", 576, 576),
        ("mlp.gate_proj", 1536, 576),
        ("mlp.up_proj", 1536, 576),
        ("mlp.down_proj", 576, 1536),
    ];
    let mut tensors = HashMap::new();
    let mut seed = 1;
    for layer in 0..30 {
        for (m, out, inp) in modules {
            let key = format!("base_model.model.model.layers.{layer}.{m}");
            tensors.insert(
                format!("{key}.lora_A.weight"),
                common::tensor(seed, &[8, inp], 0.05),
            );
            tensors.insert(
                format!("{key}.lora_B.weight"),
                common::tensor(seed + 1, &[out, 8], 0.05),
            );
            seed += 2;
        }
    }
    let out = dir.join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors")).unwrap();
    std::fs::write(
        out.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}"#,
    )
    .unwrap();
    out
}

fn cli_merge(base: &Path, adapter: &Path, out: &Path, target: &str) -> String {
    let o = Command::new(LORA)
        .args(["merge", "--base"])
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(["--type", target])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn smollm2_merged_into_its_q4_1_gguf_gives_the_logits_of_base_plus_adapter() {
    let Some(model) = lora::models::cache::smollm2_or_skip("GGUF merge").unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let adapter = smollm2_adapter(dir.path());
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llm/smollm2-adapter/reference.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = reference["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();

    let mut unmerged = load_llama(&model, DType::F32, &Device::Cpu).unwrap();
    let base_logits = logits(&unmerged, &ids);
    unmerged.load_adapter(&adapter).unwrap();
    let want = logits(&unmerged, &ids);
    drop(unmerged);
    let effect = norm(&(&want - &base_logits).unwrap());
    let scale = max_abs(&want);

    // f32: float rounding only ((W + s B A) x against W x + s B (A x)).
    let f32_out = dir.path().join("merged-f32.gguf");
    let stdout = cli_merge(&model, &adapter, &f32_out, "f32");
    assert!(
        stdout.contains("merged 210 of 272 tensors (0 fell back)"),
        "{stdout}"
    );
    let got = logits(
        &load_llama(&f32_out, DType::F32, &Device::Cpu).unwrap(),
        &ids,
    );
    let d = common::max_abs_diff(&got, &want);
    println!("SmolLM2 f32 merge vs base + adapter: max |diff| {d:.3e} (max |logit| {scale:.2}, adapter effect ||dlogits|| {effect:.3e})");
    assert!(d <= 1e-4 * scale, "{d} vs {scale}");

    // `same` (Q4_1 again) and `q4_k` (180 tensors of rows of 576 fall back to q5_0, the 30
    // down projections with rows of 1536 take q4_k): within the requantization bound.
    for target in ["same", "q4_k"] {
        let out = dir.path().join(format!("merged-{target}.gguf"));
        let options = GgufMergeOptions {
            target: target.parse().unwrap(),
            ..Default::default()
        };
        let report = merge_gguf(&model, &adapter, &out, &options, &mut |_, _| {}).unwrap();
        let fallbacks = report.merged.iter().filter(|t| t.fell_back()).count();
        if target == "q4_k" {
            assert_eq!(fallbacks, 180);
            for t in &report.merged {
                let want = if t.name.contains("ffn_down") {
                    "q4_k"
                } else {
                    "q5_0"
                };
                assert_eq!(t.written_name(), want, "{}", t.name);
            }
        } else {
            assert_eq!(fallbacks, 0);
        }
        let got = logits(&load_llama(&out, DType::F32, &Device::Cpu).unwrap(), &ids);
        let diff = norm(&(&got - &want).unwrap());
        let bound = requant_bound(&report, &adapter, effect);
        let argmax_same = got.argmax(2).unwrap().to_vec2::<u32>().unwrap()
            == want.argmax(2).unwrap().to_vec2::<u32>().unwrap();
        println!(
            "SmolLM2 {target} merge: requant error max rel. {:.3e}, mean rel. {:.3e}; ||dlogits|| {diff:.3e}, bound {bound:.3e}; same argmax at every position: {argmax_same}",
            report.max_rel_error(),
            report.mean_rel_error()
        );
        assert!(diff <= bound, "{target}: {diff} > {bound}");
    }
}

fn gguf_fixture() -> PathBuf {
    fixtures().join("gguf/quant.gguf")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("gguf/expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn dequantized(path: &Path, name: &str) -> Tensor {
    let (mut f, c) = read_gguf(path);
    c.tensor(&mut f, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

#[test]
fn quant_blocks_read_and_write_as_the_gguf_package_does() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let path = gguf_fixture();
    let want = expected();
    // K-quant blocks of random bytes: candle reads them as gguf-py does, so the blocks candle
    // writes read the same in llama.cpp's tools.
    for t in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
        let name = format!("random.{t}");
        let got = dequantized(&path, &name);
        let want = &want[&format!("deq.{name}")];
        let d = common::max_abs_diff(&got, want);
        println!(
            "{name}: max |candle - gguf-py| {d:.3e} (max {:.3e})",
            max_abs(want)
        );
        assert!(d <= 1e-6 * max_abs(want), "{name}: {d}");
    }
    // The legacy types gguf-py quantizes: candle reads its blocks, and its own quantization of
    // the same values gives the same values (both are ggml's reference quantizer; measured
    // equal, asserted within one quantization step).
    let x = dequantized(&path, "x");
    for (t, dtype) in [
        ("q4_0", GgmlDType::Q4_0),
        ("q4_1", GgmlDType::Q4_1),
        ("q5_0", GgmlDType::Q5_0),
        ("q5_1", GgmlDType::Q5_1),
        ("q8_0", GgmlDType::Q8_0),
    ] {
        let name = format!("x.{t}");
        let theirs = &want[&format!("deq.{name}")];
        let read = dequantized(&path, &name);
        assert!(common::max_abs_diff(&read, theirs) <= 1e-7, "{name}");
        let ours = QTensor::quantize(&x, dtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let levels = match dtype {
            GgmlDType::Q8_0 => 255.0,
            GgmlDType::Q5_0 | GgmlDType::Q5_1 => 31.0,
            _ => 15.0,
        };
        let step = 2.0 * max_abs(&x) / levels;
        let d = common::max_abs_diff(&ours, theirs);
        println!("{name}: max |candle quantize - gguf-py quantize| {d:.3e} (step {step:.3e})");
        assert!(d <= step, "{name}: {d} > {step}");
    }
    // candle's K-quant quantizer on the same values: dequantized (as gguf-py would) within the
    // usual error of each type.
    for (dtype, limit) in [
        (GgmlDType::Q2K, 0.40),
        (GgmlDType::Q3K, 0.20),
        (GgmlDType::Q4K, 0.10),
        (GgmlDType::Q5K, 0.05),
        (GgmlDType::Q6K, 0.025),
    ] {
        let back = QTensor::quantize(&x, dtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let rel = norm(&(&back - &x).unwrap()) / norm(&x);
        println!("{dtype:?}: ||q(x) - x|| / ||x|| = {rel:.3e}");
        assert!(rel <= limit, "{dtype:?}: {rel}");
    }
}

#[test]
fn k_quant_tensors_merge_with_the_permuted_delta_and_keep_their_type() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("gguf/adapter");
    let want = expected();
    let f32_out = dir.path().join("f32.gguf");
    let report = merge(&gguf_fixture(), &adapter, &f32_out, "f32");
    assert_eq!(report.merged.len(), 2);
    for name in ["blk.0.attn_q.weight", "blk.0.attn_k.weight"] {
        // gguf-py's dequantization + llama.cpp's permutation of the delta, computed in numpy.
        let expected = &want[&format!("merged.{name}")];
        let got = dequantized(&f32_out, name);
        let d = common::max_abs_diff(&got, expected);
        println!("{name}: max |merged - gguf-py reference| {d:.3e}");
        assert!(d <= 1e-6 * max_abs(expected), "{name}: {d}");
    }
    // `same` keeps Q4_K and Q6_K (rows of 256), and the error the report gives is the error of
    // the written blocks against the reference.
    let same_out = dir.path().join("same.gguf");
    let same = merge(&gguf_fixture(), &adapter, &same_out, "same");
    for t in &same.merged {
        assert!(!t.fell_back());
        let stored = if t.name.contains("attn_q") {
            "q4_k"
        } else {
            "q6_k"
        };
        assert_eq!(t.written_name(), stored, "{}", t.name);
        let expected = &want[&format!("merged.{}", t.name)];
        let got = dequantized(&same_out, &t.name);
        let max_rel = f64::from(common::max_abs_diff(&got, expected) / max_abs(expected));
        println!(
            "{}: {} requantization error max rel. {:.3e} (report {:.3e}), mean rel. {:.3e}",
            t.name,
            t.written_name(),
            max_rel,
            t.max_rel_error,
            t.mean_rel_error
        );
        assert!((max_rel - t.max_rel_error).abs() <= 1e-6, "{}", t.name);
        assert!(t.max_rel_error > 0.0 && t.max_rel_error < 0.1);
    }
    // Every K-quant can be asked for: rows of 256 need no fallback.
    for target in ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
        let out = dir.path().join(format!("{target}.gguf"));
        let r = merge(&gguf_fixture(), &adapter, &out, target);
        assert!(r
            .merged
            .iter()
            .all(|t| t.written_name() == target && !t.fell_back()));
    }
}

fn export(adapter: &Path, out: &Path, outtype: &str) -> lora::models::gguf::ExportReport {
    use lora::models::gguf::{export_lora_gguf, ExportOptions};
    let options = ExportOptions {
        outtype: outtype.parse().unwrap(),
    };
    export_lora_gguf(adapter, &gguf_fixture(), out, &options).unwrap()
}

#[test]
fn exported_adapters_have_llama_cpp_s_layout_and_peft_s_scaling() {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::GgmlDType;
    let dir = tempfile::tempdir().unwrap();
    let want = expected();

    // The layout of convert_lora_to_gguf.py: names, [r, in] / [out, r], B rows permuted.
    let out = dir.path().join("adapter.gguf");
    let report = export(&fixtures().join("gguf/adapter"), &out, "f32");
    assert_eq!((report.modules, report.alpha), (2, 8.0));
    assert!(report.folded.is_empty());
    let (_, c) = read_gguf(&out);
    let text = |k: &str| match &c.metadata[k] {
        Value::String(s) => s.clone(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("general.type"), "adapter");
    assert_eq!(text("adapter.type"), "lora");
    assert_eq!(text("general.architecture"), "llama");
    assert!(matches!(c.metadata["adapter.lora.alpha"], Value::F32(a) if a == 8.0));
    assert_eq!(c.tensor_infos.len(), 4);
    for name in ["blk.0.attn_q.weight", "blk.0.attn_k.weight"] {
        for side in ["lora_a", "lora_b"] {
            let key = format!("{name}.{side}");
            let got = dequantized(&out, &key);
            let expected = &want[&format!("export.{key}")];
            assert_eq!(got.dims(), expected.dims(), "{key}");
            assert_eq!(common::max_abs_diff(&got, expected), 0.0, "{key}");
        }
    }

    // rsLoRA, rank_pattern and alpha_pattern: one alpha for the file, the rest folded into B, so
    // llama.cpp's alpha / r * B A is PEFT's delta for every module.
    let out = dir.path().join("patterns.gguf");
    let report = export(&fixtures().join("gguf/adapter-patterns"), &out, "f32");
    // q: 32 / sqrt(4) = 16 needs alpha 64; k: 8 / sqrt(2) needs 8 sqrt(2): folded into B.
    assert_eq!(report.alpha, 64.0);
    assert_eq!(report.folded.len(), 1);
    assert!((report.folded[0].1 - 8.0 * 2f64.sqrt() / 64.0).abs() < 1e-12);
    let (_, c) = read_gguf(&out);
    let alpha = match c.metadata["adapter.lora.alpha"] {
        Value::F32(a) => f64::from(a),
        ref other => panic!("{other:?}"),
    };
    for name in ["blk.0.attn_q.weight", "blk.0.attn_k.weight"] {
        let b = dequantized(&out, &format!("{name}.lora_b"));
        let a = dequantized(&out, &format!("{name}.lora_a"));
        let r = b.dim(1).unwrap() as f64;
        let delta = (b.matmul(&a).unwrap() * (alpha / r)).unwrap();
        let expected = &want[&format!("patterns.{name}.delta")];
        let d = common::max_abs_diff(&delta, expected);
        println!("{name}: llama.cpp's scaled delta vs PEFT's: max |diff| {d:.3e}");
        assert!(d <= 1e-6 * max_abs(expected), "{name}: {d}");
    }

    // q8_0: A (rows of 256) is q8_0, B (rows of r = 4) falls back to f16 as llama.cpp's
    // converter does.
    let out = dir.path().join("q8.gguf");
    let report = export(&fixtures().join("gguf/adapter"), &out, "q8_0");
    assert_eq!(report.fallbacks.len(), 2);
    let (_, c) = read_gguf(&out);
    assert_eq!(
        c.tensor_infos["blk.0.attn_q.weight.lora_a"].ggml_dtype,
        GgmlDType::Q8_0
    );
    assert_eq!(
        c.tensor_infos["blk.0.attn_q.weight.lora_b"].ggml_dtype,
        GgmlDType::F16
    );
}

#[test]
fn dora_and_unfit_adapters_are_not_exported() {
    use lora::models::gguf::{export_lora_gguf, ExportOptions};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let dora = tiny_dora(dir.path());
    let err = export_lora_gguf(&dora, &tiny(), &out, &ExportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("use_dora") && err.contains("adapter_model.safetensors"),
        "{err}"
    );
    let err = export_lora_gguf(
        &fixtures().join("llm/smollm2-adapter"),
        &tiny(),
        &out,
        &ExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tiny-llama.gguf") && err.contains("q_proj"),
        "{err}"
    );
    assert!(!out.exists());
    // The CLI names a bad --outtype.
    let o = Command::new(LORA)
        .args(["export", "--format", "gguf", "--adapter"])
        .arg(fixtures().join("gguf/adapter"))
        .arg("--base")
        .arg(gguf_fixture())
        .arg("--out")
        .arg(&out)
        .args(["--outtype", "q4_0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("`q4_0`"), "{stderr}");
    assert!(!out.exists());
}
