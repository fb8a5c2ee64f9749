//! PEFT's tensor names: `base_model.model.<module path>.lora_A.weight` (or, for an embedding,
//! `...lora_embedding_A`), as written and as read.

use std::path::Path;

use crate::error::{Error, Factor, Result};
use crate::layout::FactorNames;

/// The PEFT name of a factor of the default adapter: `base_model.model.<path>.lora_A.weight`
/// (`base_model.model.lora_A.weight` for a layer at the root; `...lora_embedding_A` for an
/// embedding).
pub(crate) fn peft_key(path: &str, names: FactorNames, factor: Factor) -> String {
    named_key(path, names, factor, None)
}

/// PEFT's state-dict name of a factor of the adapter `name` (`...lora_A.<name>.weight`), or of
/// the default adapter as files store it (`...lora_A.weight`) when `name` is `None`. Embedding
/// factors have no `.weight` (`...lora_embedding_A.<name>`).
pub(crate) fn named_key(
    path: &str,
    names: FactorNames,
    factor: Factor,
    name: Option<&str>,
) -> String {
    let sep = if path.is_empty() { "" } else { "." };
    let factor = names.factor_name(factor);
    let weight = if names.has_weight_suffix() {
        ".weight"
    } else {
        ""
    };
    match name {
        None => format!("base_model.model.{path}{sep}{factor}{weight}"),
        Some(n) => format!("base_model.model.{path}{sep}{factor}.{n}{weight}"),
    }
}

/// Splits a PEFT key into module path, factor and naming: accepts `base_model.model.` or not,
/// and an adapter-name infix (`lora_A.default.weight`, `lora_embedding_A.default`).
pub(crate) fn parse_key(key: &str, file: &Path) -> Result<(String, Factor, FactorNames)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.contains(&"lora_magnitude_vector") {
        return Err(Error::Unsupported {
            path: Some(file.to_path_buf()),
            field: key.to_string(),
            reason: "DoRA magnitude vectors are not supported".to_string(),
        });
    }
    let found = parts.iter().enumerate().find_map(|(i, p)| {
        let named = match *p {
            "lora_A" => (Factor::A, FactorNames::Lora),
            "lora_B" => (Factor::B, FactorNames::Lora),
            "lora_embedding_A" => (Factor::A, FactorNames::Embedding),
            "lora_embedding_B" => (Factor::B, FactorNames::Embedding),
            _ => return None,
        };
        Some((i, named))
    });
    let Some((pos, (factor, names))) = found.filter(|&(p, _)| p > 0) else {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected `<module>.lora_A.weight`, `<module>.lora_B.weight` or \
             `<module>.lora_embedding_A` / `lora_embedding_B`",
        ));
    };
    let tail = &parts[pos + 1..];
    let well_formed = if names.has_weight_suffix() {
        tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight" && !tail[0].is_empty())
    } else {
        tail.is_empty() || (tail.len() == 1 && !tail[0].is_empty() && tail[0] != "weight")
    };
    if !well_formed {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected the key to end in `lora_A.weight`, `lora_B.weight` or \
             `lora_A.<adapter>.weight` (embeddings: `lora_embedding_A` or `lora_embedding_A.<adapter>`)",
        ));
    }
    Ok((parts[..pos].join("."), factor, names))
}
