//! The `lora` command-line tool: merge of single-file, sharded, f16 and bf16 bases against an
//! independent f64 reference, refusal of broken adapters with no output left behind, inspect.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Tensor};
use common::tensor;

const LORA: &str = env!("CARGO_BIN_EXE_lora");

/// Module path -> (weight [out, in]).
fn base_tensors() -> Vec<(String, Tensor)> {
    let mut v = Vec::new();
    for l in 0..2 {
        for (name, out, inp) in [("q_proj", 24, 16), ("k_proj", 24, 16), ("v_proj", 16, 16)] {
            v.push((
                format!("model.layers.{l}.self_attn.{name}.weight"),
                tensor(l * 10 + out as u64, &[out, inp], 1.0),
            ));
        }
    }
    v.push((
        "model.embed_tokens.weight".into(),
        tensor(99, &[32, 16], 1.0),
    ));
    v.push(("model.norm.weight".into(), tensor(98, &[16], 1.0)));
    v
}

fn save(path: &Path, tensors: &[(String, Tensor)], dtype: DType) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// A PEFT adapter on q_proj and v_proj of both layers, rank 4, alpha 8, v_proj of layer 1 with
/// rank 2 (rank_pattern) and alpha 2 (alpha_pattern).
fn write_adapter(dir: &Path, extra_config: &str) -> HashMap<String, (Tensor, Tensor, f64)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    let mut factors = HashMap::new();
    for l in 0..2u64 {
        for (name, out, inp) in [("q_proj", 24, 16), ("v_proj", 16, 16)] {
            let module = format!("model.layers.{l}.self_attn.{name}");
            let special = l == 1 && name == "v_proj";
            let (r, alpha) = if special { (2, 2.0) } else { (4, 8.0) };
            let a = tensor(l * 7 + out as u64 + 1, &[r, inp], 0.3);
            let b = tensor(l * 7 + out as u64 + 2, &[out, r], 0.3);
            tensors.push((
                format!("base_model.model.{module}.lora_A.weight"),
                a.clone(),
            ));
            tensors.push((
                format!("base_model.model.{module}.lora_B.weight"),
                b.clone(),
            ));
            factors.insert(format!("{module}.weight"), (a, b, alpha / r as f64));
        }
    }
    save(&dir.join("adapter_model.safetensors"), &tensors, DType::F32);
    let config = format!(
        r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {{"layers.1.self_attn.v_proj": 2}}, "alpha_pattern": {{"layers.1.self_attn.v_proj": 2}}{extra_config}}}"#
    );
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    factors
}

/// W + s B A computed in f64 on the host: independent of candle's matmul.
fn reference(w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Vec<f64> {
    let w: Vec<Vec<f32>> = w.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
    let mut out = Vec::new();
    for (i, row) in w.iter().enumerate() {
        for (j, wij) in row.iter().enumerate() {
            let d: f64 = (0..a.len())
                .map(|k| f64::from(b[i][k]) * f64::from(a[k][j]))
                .sum();
            out.push(f64::from(*wij) + s * d);
        }
    }
    out
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(LORA).args(args).output().unwrap()
}

fn check_merged(
    out: &HashMap<String, Tensor>,
    factors: &HashMap<String, (Tensor, Tensor, f64)>,
    dtype: DType,
) {
    // One rounding of the f32 result to the output dtype (half an ulp), plus the f32 error of a
    // rank-4 dot product and one addition (a few f32 ulps), relative to the value.
    let rel = match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => 0.0,
    } + 8.0 * f64::from(f32::EPSILON);
    for (name, base) in base_tensors() {
        let got = &out[&name];
        assert_eq!(got.dtype(), dtype, "{name}");
        let got: Vec<f32> = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        match factors.get(&name) {
            Some((a, b, s)) => {
                let want = reference(&base.to_dtype(dtype).unwrap(), a, b, *s);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (f64::from(*g) - w).abs() <= rel * w.abs() + 1e-6,
                        "{name}: {g} vs {w}"
                    );
                }
            }
            None => {
                let want: Vec<f32> = base
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(got, want, "{name} must be copied unchanged");
            }
        }
    }
}

#[test]
fn merges_single_files_in_every_float_dtype() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("model.safetensors");
        save(&base, &base_tensors(), dtype);
        let factors = write_adapter(&dir.path().join("adapter"), "");
        let out = dir.path().join("merged.safetensors");
        let o = run(&[
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            dir.path().join("adapter").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("merged 4 of 8 tensors"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        check_merged(
            &candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap(),
            &factors,
            dtype,
        );
    }
}

#[test]
fn merges_a_sharded_base_into_the_same_shards() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    let all = base_tensors();
    let (first, second) = all.split_at(4);
    save(
        &base.join("model-00001-of-00002.safetensors"),
        first,
        DType::BF16,
    );
    save(
        &base.join("model-00002-of-00002.safetensors"),
        second,
        DType::BF16,
    );
    let weight_map: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            (
                k.clone(),
                format!(
                    "model-0000{}-of-00002.safetensors",
                    if i < 4 { 1 } else { 2 }
                )
                .into(),
            )
        })
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(base.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let factors = write_adapter(&dir.path().join("adapter"), "");
    let out = dir.path().join("merged");
    let o = run(&[
        "merge",
        "--quiet",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        dir.path().join("adapter").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let mut merged =
        candle_core::safetensors::load(out.join(&files[0]), &candle_core::Device::Cpu).unwrap();
    assert_eq!(merged.len(), 4, "tensors stay in their shard");
    merged.extend(
        candle_core::safetensors::load(out.join(&files[1]), &candle_core::Device::Cpu).unwrap(),
    );
    check_merged(&merged, &factors, DType::BF16);
    assert_eq!(
        std::fs::read(out.join(&files[2])).unwrap(),
        std::fs::read(base.join(&files[2])).unwrap()
    );
}

/// Loads the adapter's tensors, lets `edit` change them, and writes them back.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let file = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &file).unwrap();
}

fn assert_refused(adapter_setup: impl Fn(&Path), expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("model.safetensors");
    save(&base, &base_tensors(), DType::F32);
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter, "");
    adapter_setup(&adapter);
    let out = dir.path().join("out").join("merged.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let o = run(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "must fail: {expected}");
    assert!(
        stderr.contains(expected),
        "stderr should name `{expected}`: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().collect();
    assert!(left.is_empty(), "no output may be left behind: {left:?}");
}

#[test]
fn refuses_broken_foreign_or_mismatched_adapters_leaving_no_output() {
    // A module the base does not have.
    assert_refused(
        |dir| {
            edit_tensors(dir, |t| {
                t.insert(
                    "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight".into(),
                    tensor(1, &[4, 16], 1.0),
                );
                t.insert(
                    "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight".into(),
                    tensor(1, &[24, 4], 1.0),
                );
            });
        },
        "model.layers.5.self_attn.q_proj.weight",
    );
    // A shape that does not fit the base weight.
    assert_refused(
        |dir| {
            edit_tensors(dir, |t| {
                t.insert(
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                    tensor(1, &[4, 12], 1.0),
                );
            });
        },
        "model.layers.0.self_attn.q_proj.lora_A.weight",
    );
    // `use_dora` over a file without DoRA magnitudes.
    assert_refused(
        |dir| {
            write_adapter(dir, r#", "use_dora": true"#);
        },
        "use_dora",
    );
    // A truncated tensor file.
    assert_refused(
        |dir| {
            let p = dir.join("adapter_model.safetensors");
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        },
        "adapter_model.safetensors",
    );
    // NaN in a factor.
    assert_refused(
        |dir| {
            edit_tensors(dir, |t| {
                let nan = Tensor::full(f32::NAN, (24, 4), &candle_core::Device::Cpu).unwrap();
                t.insert(
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                    nan,
                );
            });
        },
        "NaN",
    );
    // No config.
    assert_refused(
        |dir| std::fs::remove_file(dir.join("adapter_config.json")).unwrap(),
        "adapter_config.json",
    );
}

#[test]
fn inspect_prints_ranks_alphas_and_size() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "");
    let o = run(&["inspect", dir.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("rank:       2 (1 modules), 4 (3 modules)"),
        "{s}"
    );
    assert!(
        s.contains("scaling:    1.000000 (1 modules), 2.000000 (3 modules) (alpha/r)"),
        "{s}"
    );
    assert!(s.contains("parameters: 512"), "{s}");
    assert!(s.contains("dtype:      F32"), "{s}");
}

/// PEFT's AdaLoRA adapter with a rank pattern (`tests/fixtures/peft/adalora`): ranks after
/// pruning, AdaLoRA's scaling, the `lora_E` parameters counted.
#[test]
fn inspect_understands_adalora_adapters() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/adalora/pattern/adapter");
    let o = run(&["inspect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("rank:       1 (1 modules), 2 (1 modules), 4 (4 modules)"),
        "{s}"
    );
    assert!(s.contains("(AdaLoRA: alpha/(ranknum + 1e-5))"), "{s}");
    assert!(
        s.contains("adalora:    init_r 4 (ranknum), target_r 2, 3 modules with a rank pattern"),
        "{s}"
    );
    // A, E and B: 4 modules of rank 4, one of rank 2 and one of rank 1.
    assert!(s.contains("parameters: 907"), "{s}");
}

#[test]
fn refuses_an_adapter_saved_for_another_base_unless_told_not_to_check() {
    use lora::{LoraLinear, LoraModelExt};
    let dir = tempfile::tempdir().unwrap();
    // An adapter saved by this crate on base A records A's fingerprint.
    let w_a = tensor(1, &[8, 6], 1.0);
    let mut model = vec![LoraLinear::new(w_a.clone(), None)];
    model.init_adapter(&candle_nn::VarMap::new()).unwrap();
    let adapter = dir.path().join("adapter");
    model.save_adapter(&adapter).unwrap();
    // Its module path is "0": base tensors are named "0.weight".
    let base_b = dir.path().join("b.safetensors");
    save(
        &base_b,
        &[("0.weight".to_string(), tensor(2, &[8, 6], 1.0))],
        DType::F32,
    );
    let out = dir.path().join("merged.safetensors");
    let args = |base: &Path, extra: &[&str]| {
        let mut v = vec![
            "merge",
            "--quiet",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let o = Command::new(LORA)
        .args(args(&base_b, &[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("different base weight") && stderr.contains("--no-verify-base"),
        "{stderr}"
    );
    assert!(!out.exists());
    let o = Command::new(LORA)
        .args(args(&base_b, &["--no-verify-base"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&out).unwrap();
    // On its own base it merges without the flag.
    let base_a = dir.path().join("a.safetensors");
    save(&base_a, &[("0.weight".to_string(), w_a)], DType::F32);
    let o = Command::new(LORA)
        .args(args(&base_a, &[]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
