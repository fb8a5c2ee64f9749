//! A PiSSA or OLoRA adapter turned into a plain LoRA adapter against the ORIGINAL base, as PEFT's
//! `save_pretrained(..., path_initial_model_for_weight_conversion=...)` does.
//!
//! Those initialisations take `s B0 A0` out of the weight (`W = W_res + s B0 A0`), so the trained
//! adapter only applies to the residual base `W_res`, which serving engines do not have. The
//! trained model is `W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]`: a plain adapter
//! of rank `2r` with the same scaling (`lora_alpha` doubled, `* sqrt 2` with rsLoRA; the rank and
//! alpha patterns doubled), which any engine loads onto the original weights.

use std::path::Path;

use candle_core::Tensor;

use super::write::{pt_metadata, serialize_tensors};
use super::{AdapterFile, ADAPTER_FILE, CONFIG_FILE};
use crate::config::InitLoraWeights;
use crate::error::{Error, Result};
use crate::fs::{RealFs, Staging};

/// Writes to `out` the plain LoRA adapter equivalent to the PiSSA / OLoRA adapter `trained`
/// given the adapter `initial` saved right after initialisation (both PEFT adapter
/// directories), for the original base weights. `out` is written atomically.
///
/// # Errors
/// Errors reading either adapter (naming the file), [`Error::InvalidConfig`] when the two do
/// not describe the same modules with the same ranks or use DoRA or AdaLoRA, or rsLoRA with rank or alpha
/// patterns (which PEFT refuses too), and I/O errors writing `out`.
pub fn convert_to_lora(
    trained: impl AsRef<Path>,
    initial: impl AsRef<Path>,
    out: impl AsRef<Path>,
) -> Result<()> {
    let (trained, initial, out) = (trained.as_ref(), initial.as_ref(), out.as_ref());
    let t = AdapterFile::read(trained)?;
    let i = AdapterFile::read(initial)?;
    let config_path = trained.join(CONFIG_FILE);
    let invalid = |field: &str, reason: String| Error::InvalidConfig {
        file: Some(config_path.clone()),
        field: field.into(),
        reason,
    };
    if t.config.use_dora || i.config.use_dora {
        return Err(invalid(
            "use_dora",
            "a DoRA adapter is not a low-rank change of the weight: it cannot be converted".into(),
        ));
    }
    if t.config.adalora.is_some() || i.config.adalora.is_some() {
        return Err(invalid(
            "peft_type",
            "an AdaLoRA adapter has no PiSSA / OLoRA initialisation to convert from".into(),
        ));
    }
    if t.config.use_rslora
        && !(t.config.rank_pattern.is_empty() && t.config.alpha_pattern.is_empty())
    {
        return Err(invalid(
            "use_rslora",
            "rsLoRA with rank_pattern or alpha_pattern cannot be converted (as in PEFT)".into(),
        ));
    }
    let initial_modules: Vec<&String> = i.factors.keys().collect();
    let trained_modules: Vec<&String> = t.factors.keys().collect();
    if initial_modules != trained_modules {
        return Err(invalid(
            "target_modules",
            format!(
                "the trained adapter has modules {trained_modules:?}, the initial one (`{}`) {initial_modules:?}",
                initial.display()
            ),
        ));
    }
    let file = out.join(ADAPTER_FILE);
    let mut tensors = Vec::with_capacity(2 * t.factors.len());
    for (module, f) in &t.factors {
        let Some(f0) = i.factors.get(module) else {
            continue; // the module lists are equal (checked above)
        };
        if f.a.dims() != f0.a.dims() || f.b.dims() != f0.b.dims() {
            return Err(invalid(
                "r",
                format!(
                    "`{module}`: trained factors {:?} / {:?}, initial {:?} / {:?}",
                    f.a.dims(),
                    f.b.dims(),
                    f0.a.dims(),
                    f0.b.dims()
                ),
            ));
        }
        let at = |e: candle_core::Error| Error::bad_tensor(&file, &f.a_key, e.to_string());
        let a = Tensor::cat(&[&f.a, &f0.a.to_dtype(f.a.dtype()).map_err(at)?], 0).map_err(at)?;
        let b = Tensor::cat(
            &[
                &f.b,
                &f0.b.to_dtype(f.b.dtype()).map_err(at)?.neg().map_err(at)?,
            ],
            1,
        )
        .map_err(at)?;
        tensors.push((f.a_key.clone(), a));
        tensors.push((f.b_key.clone(), b));
    }
    let mut config = t.config.clone();
    config.rank *= 2;
    config.alpha *= if config.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    for r in config.rank_pattern.values_mut() {
        *r *= 2;
    }
    for a in config.alpha_pattern.values_mut() {
        *a *= 2.0;
    }
    config.init = InitLoraWeights::Bool(true);
    let bytes = serialize_tensors(&tensors, pt_metadata(), &file)?;
    let json = config.to_json()?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut staging = Staging::new(&RealFs);
    staging.write(&file, &bytes)?;
    staging.write(&out.join(CONFIG_FILE), json.as_bytes())?;
    staging.commit()
}
