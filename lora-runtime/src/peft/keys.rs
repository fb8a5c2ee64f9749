//! PEFT's tensor names: `base_model.model.<module path>.lora_A.weight` (for an embedding,
//! `...lora_embedding_A`), as written and as read; DoRA's magnitude is
//! `base_model.model.<module path>.lora_magnitude_vector` (no `.weight`) in files PEFT 0.21
//! writes. The names themselves come from [`FactorNames`], the one table both ways.

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
/// factors have no `.weight` (`...lora_embedding_A.<name>`); DoRA's magnitude has none in files
/// (`...lora_magnitude_vector`) and has one in PEFT's state dict
/// (`...lora_magnitude_vector.<name>.weight`).
pub(crate) fn named_key(
    path: &str,
    names: FactorNames,
    factor: Factor,
    name: Option<&str>,
) -> String {
    let sep = if path.is_empty() { "" } else { "." };
    let weight = if names.has_weight_suffix(factor, name.is_some()) {
        ".weight"
    } else {
        ""
    };
    let factor = names.factor_name(factor);
    match name {
        None => format!("base_model.model.{path}{sep}{factor}{weight}"),
        Some(n) => format!("base_model.model.{path}{sep}{factor}.{n}{weight}"),
    }
}

/// Splits a PEFT key into module path, factor and naming: accepts `base_model.model.` or not,
/// and an adapter-name infix (`lora_A.default.weight`, `lora_embedding_A.default`). DoRA's
/// magnitude is accepted as PEFT 0.21 writes it (`<module>.lora_magnitude_vector`) and in the
/// older form with `.weight`, with or without the adapter name.
pub(crate) fn parse_key(key: &str, file: &Path) -> Result<(String, Factor, FactorNames)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    let found = parts
        .iter()
        .enumerate()
        .find_map(|(i, p)| FactorNames::parse(p).map(|named| (i, named)));
    let Some((pos, (factor, mut names))) = found.filter(|&(p, _)| p > 0) else {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected `<module>.lora_A.weight`, `<module>.lora_B.weight`, \
             `<module>.lora_embedding_A` / `lora_embedding_B`, `<module>.lora_magnitude_vector` \
             or AdaLoRA's `<module>.lora_A` / `lora_E` / `lora_B`",
        ));
    };
    let tail = &parts[pos + 1..];
    let with_weight =
        tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight" && !tail[0].is_empty());
    let bare = tail.is_empty() || (tail.len() == 1 && !tail[0].is_empty() && tail[0] != "weight");
    // AdaLoRA's `lora_A` / `lora_B` are bare parameters: the same names without `.weight`.
    if names == FactorNames::Lora && matches!(factor, Factor::A | Factor::B) && bare {
        names = FactorNames::AdaLora;
    }
    let well_formed = match (factor, names.has_weight_suffix(factor, true)) {
        (Factor::Magnitude, _) => tail.is_empty() || with_weight,
        (_, true) => with_weight,
        (_, false) => bare,
    };
    if !well_formed {
        return Err(Error::bad_tensor(
            file,
            key,
            "not a LoRA factor: expected the key to end in `lora_A.weight`, `lora_B.weight`, \
             `lora_A.<adapter>.weight` or `lora_magnitude_vector` (embeddings: \
             `lora_embedding_A` or `lora_embedding_A.<adapter>`)",
        ));
    }
    Ok((parts[..pos].join("."), factor, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every factor under every naming, default adapter and named: built and parsed back by the
    /// same table.
    #[test]
    fn keys_round_trip_for_every_factor_and_naming() {
        let file = Path::new("adapter_model.safetensors");
        let cases = [
            (FactorNames::Lora, Factor::A, None, "m.lora_A.weight"),
            (FactorNames::Lora, Factor::B, Some("x"), "m.lora_B.x.weight"),
            (
                FactorNames::Lora,
                Factor::Magnitude,
                None,
                "m.lora_magnitude_vector",
            ),
            (
                FactorNames::Lora,
                Factor::Magnitude,
                Some("x"),
                "m.lora_magnitude_vector.x.weight",
            ),
            (
                FactorNames::Embedding,
                Factor::A,
                None,
                "m.lora_embedding_A",
            ),
            (
                FactorNames::Embedding,
                Factor::B,
                Some("x"),
                "m.lora_embedding_B.x",
            ),
            (FactorNames::AdaLora, Factor::A, None, "m.lora_A"),
            (FactorNames::AdaLora, Factor::E, None, "m.lora_E"),
            (FactorNames::AdaLora, Factor::B, Some("x"), "m.lora_B.x"),
        ];
        for (names, factor, name, tail) in cases {
            let key = named_key("m", names, factor, name);
            assert_eq!(key, format!("base_model.model.{tail}"));
            let (module, f, n) = parse_key(&key, file).unwrap();
            assert_eq!((module.as_str(), f, n), ("m", factor, names), "{key}");
        }
        // The older DoRA form with `.weight` and no adapter name is read too.
        let (_, f, _) = parse_key("m.lora_magnitude_vector.weight", file).unwrap();
        assert_eq!(f, Factor::Magnitude);
        for bad in [
            "m.lora_embedding_A.weight",
            "m.lora_E.weight",
            "m.lora_magnitude_vector.x",
            "lora_A.weight",
        ] {
            assert!(parse_key(bad, file).is_err(), "{bad} was accepted");
        }
    }
}
