//! The held-out metrics: loss per target token and exact match.

use anyhow::Result;
use lora::candle::{DType, Device, D};
use lora::models::sft::{Batch, CausalLm, Dataset};

/// Held-out loss per target token and the share of examples whose every target token is the
/// model's arg-max, which is exactly "greedy decoding reproduces the reference".
pub(crate) fn held_out_scores<M: CausalLm>(
    model: &M,
    data: &Dataset,
    pad: u32,
) -> Result<(f32, f64)> {
    let (mut loss, mut tokens, mut exact) = (0f64, 0usize, 0usize);
    for e in &data.examples {
        let batch = Batch::new(&[e], pad, &Device::Cpu)?;
        let hidden = model.hidden_states(&batch.inputs)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden
            .reshape((b * t, h))?
            .index_select(&batch.positions, 0)?;
        let logits = model.logits(&picked)?.detach();
        loss +=
            f64::from(lora::ops::cross_entropy_sum(&logits, &batch.labels)?.to_scalar::<f32>()?);
        tokens += batch.loss_tokens;
        let right = logits
            .argmax(D::Minus1)?
            .eq(&batch.labels)?
            .to_dtype(DType::F32)?;
        if right.sum_all()?.to_scalar::<f32>()? as usize == batch.loss_tokens {
            exact += 1;
        }
    }
    Ok((
        (loss / tokens as f64) as f32,
        exact as f64 / data.examples.len() as f64,
    ))
}
