//! PEFT's tensor names: `base_model.model.<module path>.lora_A.weight`, as written and as read.

use std::path::Path;

use crate::error::{Error, Factor, Result};

/// The PEFT name of a factor of the default adapter: `base_model.model.<path>.lora_A.weight`
/// (`base_model.model.lora_A.weight` for a layer at the root).
pub(crate) fn peft_key(path: &str, factor: Factor) -> String {
    named_key(path, factor, None)
}

/// PEFT's state-dict name of a factor of the adapter `name` (`...lora_A.<name>.weight`), or of
/// the default adapter as files store it (`...lora_A.weight`) when `name` is `None`.
pub(crate) fn named_key(path: &str, factor: Factor, name: Option<&str>) -> String {
    let sep = if path.is_empty() { "" } else { "." };
    match name {
        None => format!("base_model.model.{path}{sep}{factor}.weight"),
        Some(n) => format!("base_model.model.{path}{sep}{factor}.{n}.weight"),
    }
}

/// Splits a PEFT key into module path and factor: accepts `base_model.model.` or not, and an
/// adapter-name infix (`lora_A.default.weight`).
pub(crate) fn parse_key(key: &str, file: &Path) -> Result<(String, Factor)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    for unsupported in [
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    ] {
        if parts.contains(&unsupported) {
            let what = if unsupported == "lora_magnitude_vector" {
                "DoRA magnitude vectors are not supported"
            } else {
                "LoRA on embedding layers is not supported"
            };
            return Err(Error::Unsupported {
                path: Some(file.to_path_buf()),
                field: key.to_string(),
                reason: what.to_string(),
            });
        }
    }
    let pos = parts.iter().position(|p| *p == "lora_A" || *p == "lora_B");
    let Some(pos) = pos.filter(|&p| p > 0) else {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected `<module>.lora_A.weight` or `<module>.lora_B.weight`",
        ));
    };
    let tail = &parts[pos + 1..];
    if !(tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight" && !tail[0].is_empty())) {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected the key to end in `lora_A.weight`, `lora_B.weight` or `lora_A.<adapter>.weight`",
        ));
    }
    let factor = if parts[pos] == "lora_A" {
        Factor::A
    } else {
        Factor::B
    };
    Ok((parts[..pos].join("."), factor))
}
