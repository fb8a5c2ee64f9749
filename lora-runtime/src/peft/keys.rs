//! PEFT's tensor names: `base_model.model.<module path>.lora_A.weight`, as written and as read;
//! DoRA's magnitude is `base_model.model.<module path>.lora_magnitude_vector` (no `.weight`) in
//! files PEFT 0.21 writes.

use std::path::Path;

use crate::error::{Error, Factor, Result};

/// The PEFT name of a factor of the default adapter: `base_model.model.<path>.lora_A.weight`
/// (`base_model.model.lora_A.weight` for a layer at the root).
pub(crate) fn peft_key(path: &str, factor: Factor) -> String {
    named_key(path, factor, None)
}

/// PEFT's state-dict name of a factor of the adapter `name` (`...lora_A.<name>.weight`), or of
/// the default adapter as files store it (`...lora_A.weight`) when `name` is `None`.
///
/// DoRA's magnitude is stored without `.weight` in files (`...lora_magnitude_vector`, as PEFT
/// 0.21 saves it) and named `...lora_magnitude_vector.<name>.weight` in PEFT's state dict.
pub(crate) fn named_key(path: &str, factor: Factor, name: Option<&str>) -> String {
    let sep = if path.is_empty() { "" } else { "." };
    match (name, factor) {
        (None, Factor::Magnitude) => format!("base_model.model.{path}{sep}{factor}"),
        (None, _) => format!("base_model.model.{path}{sep}{factor}.weight"),
        (Some(n), _) => format!("base_model.model.{path}{sep}{factor}.{n}.weight"),
    }
}

/// Splits a PEFT key into module path and factor: accepts `base_model.model.` or not, and an
/// adapter-name infix (`lora_A.default.weight`). DoRA's magnitude is accepted as PEFT 0.21 writes
/// it (`<module>.lora_magnitude_vector`) and in the older form with `.weight`, with or without
/// the adapter name.
pub(crate) fn parse_key(key: &str, file: &Path) -> Result<(String, Factor)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    for unsupported in ["lora_embedding_A", "lora_embedding_B"] {
        if parts.contains(&unsupported) {
            return Err(Error::Unsupported {
                path: Some(file.to_path_buf()),
                field: key.to_string(),
                reason: "LoRA on embedding layers is not supported".to_string(),
            });
        }
    }
    let pos = parts
        .iter()
        .position(|p| matches!(*p, "lora_A" | "lora_B" | "lora_magnitude_vector"));
    let Some(pos) = pos.filter(|&p| p > 0) else {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected `<module>.lora_A.weight`, `<module>.lora_B.weight` or `<module>.lora_magnitude_vector`",
        ));
    };
    let tail = &parts[pos + 1..];
    let factor = match parts[pos] {
        "lora_A" => Factor::A,
        "lora_B" => Factor::B,
        _ => Factor::Magnitude,
    };
    let named = tail.len() == 2 && tail[1] == "weight" && !tail[0].is_empty();
    let plain = tail == ["weight"] || (factor == Factor::Magnitude && tail.is_empty());
    if !(plain || named) {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected the key to end in `lora_A.weight`, `lora_B.weight`, `lora_A.<adapter>.weight` or `lora_magnitude_vector`",
        ));
    }
    Ok((parts[..pos].join("."), factor))
}
