//! Builds malformed adapter directories for `tests/hostile_inputs.rs` (and, with
//! `LORA_WRITE_FUZZ_SEEDS=1`, seeds for `fuzz/corpus/adapter_bytes`). Every file is generated
//! here from a description, so a reviewer reads what each case is, not a binary blob.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{json, Value};

/// One tensor of a hand-built safetensors file.
pub struct T {
    pub key: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// An f32 tensor with values `0.01 * (i + seed)`.
pub fn f32s(key: &str, shape: &[usize], seed: usize) -> T {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| 0.01 * (i + seed) as f32 - 0.05).collect();
    with_values(key, shape, &values)
}

/// An f32 tensor with the given values.
pub fn with_values(key: &str, shape: &[usize], values: &[f32]) -> T {
    T {
        key: key.into(),
        dtype: "F32",
        shape: shape.to_vec(),
        data: values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// `base_model.model.<module>.<factor>.weight`.
pub fn key(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.{factor}.weight")
}

/// The factors of a valid adapter for the test model: `q_proj` (out 4, in 6) and `v_proj`
/// (out 3, in 6), rank 2.
pub fn valid_tensors() -> Vec<T> {
    vec![
        f32s(&key("q_proj", "lora_A"), &[2, 6], 1),
        f32s(&key("q_proj", "lora_B"), &[4, 2], 2),
        f32s(&key("v_proj", "lora_A"), &[2, 6], 3),
        f32s(&key("v_proj", "lora_B"), &[3, 2], 4),
    ]
}

/// The matching config: `r = 2`, `lora_alpha = 4`.
pub fn valid_config() -> Value {
    json!({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]})
}

/// The safetensors header of `tensors` with sequential offsets (and `metadata`).
pub fn header(tensors: &[T], metadata: Option<Value>) -> Value {
    let mut h = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.data.len();
        h.insert(
            t.key.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    if let Some(m) = metadata {
        h.insert("__metadata__".into(), m);
    }
    Value::Object(h)
}

/// A safetensors file from a header text and the data section.
pub fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A well-formed safetensors file.
pub fn file(tensors: &[T], metadata: Option<Value>) -> Vec<u8> {
    let data: Vec<u8> = tensors
        .iter()
        .flat_map(|t| t.data.iter().copied())
        .collect();
    raw(&header(tensors, metadata).to_string(), &data)
}

/// Writes an adapter directory: `adapter_model.safetensors` and `adapter_config.json`.
pub fn write_dir(dir: &Path, tensors: &[u8], config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), tensors).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
}

/// Writes a valid config next to `tensors`.
pub fn write_tensors(dir: &Path, tensors: &[u8]) {
    write_dir(dir, tensors, &valid_config().to_string());
}

/// Writes the valid tensors next to `config`.
pub fn write_config(dir: &Path, config: &str) {
    write_dir(dir, &file(&valid_tensors(), None), config);
}

/// The valid tensors with the one keyed `k` replaced by `t`.
pub fn replace(k: &str, t: T) -> Vec<T> {
    let mut out = valid_tensors();
    if let Some(slot) = out.iter_mut().find(|x| x.key == k) {
        *slot = T { key: k.into(), ..t };
    }
    out
}
