//! Fuzzes `adapter_config.json` parsing and everything computed from a config: the supported-
//! feature check, rank/alpha patterns (user-supplied regexes), target matching and the round
//! trip through `to_json`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use lora_runtime::LoraConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = LoraConfig::from_json(text) else {
        return;
    };
    if config
        .check_supported(Path::new("fuzz/adapter_config.json"))
        .is_err()
    {
        return;
    }
    for path in [
        "q_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.mlp.down_proj",
        "",
    ] {
        let _ = config.rank_for(path);
        let _ = config.alpha_for(path);
        let _ = config.scaling_for(path);
        let _ = config.targets_module(path);
    }
    // A config that passed the checks must serialize, and read back as itself.
    let json = config.to_json().expect("a checked config serializes");
    let back = LoraConfig::from_json(&json).expect("a written config parses");
    assert_eq!(back, config, "round trip changed the config: {json}");
});
