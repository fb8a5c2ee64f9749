//! Fuzzes adapter loading: arbitrary bytes as `adapter_model.safetensors` next to a fixed valid
//! config, then (when they parse) the base-fingerprint check and the conversion to adapters for
//! a small model. Nothing may panic, hang or allocate more than the input justifies.
#![no_main]

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;
use lora_runtime::peft::AdapterFile;
use lora_runtime::LoraLinear;

/// The config of the hostile-input tests (`tests/hostile/mod.rs`), whose files seed the corpus.
const CONFIG: &str =
    r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(adapter) = AdapterFile::from_bytes(data, CONFIG, "fuzz/adapter_model.safetensors")
    else {
        return;
    };
    let dev = Device::Cpu;
    let (Ok(wq), Ok(wv)) = (
        Tensor::zeros((4, 6), DType::F32, &dev),
        Tensor::zeros((3, 6), DType::BF16, &dev),
    ) else {
        return;
    };
    let (q, v) = (LoraLinear::new(wq, None), LoraLinear::new(wv, None));
    let layers = [("q_proj", &q), ("v_proj", &v)];
    let _ = adapter.verify_base(&layers);
    let _ = adapter.into_adapters(&layers);
});
