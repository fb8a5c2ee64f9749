//! Comparisons with reference tensors made by the fixture scripts (PEFT, transformers), with
//! errors that name what was compared.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

/// A safetensors file's tensors, on the CPU.
pub fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

/// The values in f32, flattened.
pub fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// `max |ours - reference| / max |reference|`.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} vs {:?}",
        ours.dims(),
        reference.dims()
    );
    let (o, r) = (f32s(ours)?, f32s(reference)?);
    let scale = r.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = o
        .iter()
        .zip(&r)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(diff / scale)
}

/// [`rel_err`] at most `rtol`; returns it.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, rtol: f32) -> Result<f32> {
    let err = rel_err(ours, reference).with_context(|| what.to_string())?;
    ensure!(err <= rtol, "{what}: relative error {err:e} > {rtol:e}");
    Ok(err)
}
