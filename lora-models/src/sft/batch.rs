//! Batches of examples and the causal language-modelling loss over their target positions.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lora_runtime::train::Checkpointing;
use lora_runtime::LoraModel;

use super::data::Example;
use crate::error::Result;
use crate::tokenizer::TextTokenizer;

/// A causal language model the training loop can drive: hidden states, then the LM head on the
/// positions the loss needs (so the vocabulary-sized projection is paid only for targets).
pub trait CausalLm: LoraModel {
    /// The final hidden states `[b, t, hidden]` of token ids `[b, t]` (no cache).
    ///
    /// # Errors
    /// Shape errors; ids outside the vocabulary.
    fn hidden_states(&self, ids: &Tensor) -> Result<Tensor>;
    /// The logits `[n, vocab]` of hidden states `[n, hidden]`.
    ///
    /// # Errors
    /// Shape errors.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
    /// The LM head's weight `W [vocab, hidden]` when [`logits`](Self::logits) is exactly
    /// `hidden W^T` (`None`, the default: it is something else). With it the loss fuses the
    /// head and the cross-entropy and never holds the `[n, vocab]` logits
    /// ([`lora_runtime::ops::linear_cross_entropy_sum`]).
    fn lm_head_weight(&self) -> Option<&Tensor> {
        None
    }
    /// Checkpoints the model's blocks in [`hidden_states`](Self::hidden_states) (`None`: off).
    ///
    /// # Errors
    /// [`ModelError::Input`](crate::ModelError::Input) when the model cannot (the default).
    fn set_gradient_checkpointing(&mut self, ck: Option<Checkpointing>) -> Result<()> {
        match ck {
            None => Ok(()),
            Some(_) => Err(crate::ModelError::Input(
                "this model does not support gradient checkpointing".into(),
            )),
        }
    }
    /// Makes every weight trainable (full fine-tuning) and returns them, named as the
    /// checkpoint names them; tied weights appear once.
    ///
    /// # Errors
    /// Candle errors copying the weights.
    fn unfreeze(&mut self) -> Result<Vec<(String, Var)>>;
    /// Writes the model as a checkpoint directory (config, weights, tokenizer) that
    /// [`Pretrained::load`](crate::Pretrained::load) and transformers load.
    ///
    /// # Errors
    /// I/O errors naming the file.
    fn save_pretrained(&self, dir: &Path, tokenizer: &TextTokenizer) -> Result<()>;
}

/// Padded inputs and the flattened target positions of a batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input ids `[b, t]` (each example without its last token, padded on the right).
    pub inputs: Tensor,
    /// Indices into the flattened `[b * t]` positions whose next token is a target, `[n]`.
    pub positions: Tensor,
    /// The target ids at those positions, `[n]`.
    pub labels: Tensor,
    /// `n`: tokens the loss covers.
    pub loss_tokens: usize,
    /// Real (not padding) input tokens.
    pub tokens: usize,
}

impl Batch {
    /// Pads `examples` with `pad` on the right (causal attention never looks at the padding
    /// from a real position) and collects their target positions.
    ///
    /// # Errors
    /// Candle errors building the tensors.
    pub fn new(examples: &[&Example], pad: u32, device: &Device) -> Result<Self> {
        let t = examples
            .iter()
            .map(|e| e.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let b = examples.len();
        let mut inputs = vec![pad; b * t];
        let (mut positions, mut labels) = (Vec::new(), Vec::new());
        let mut tokens = 0;
        for (row, e) in examples.iter().enumerate() {
            let n = e.ids.len().saturating_sub(1);
            inputs[row * t..row * t + n].copy_from_slice(&e.ids[..n]);
            tokens += n;
            for j in 0..n {
                if e.targets[j + 1] {
                    positions.push((row * t + j) as u32);
                    labels.push(e.ids[j + 1]);
                }
            }
        }
        let n = labels.len();
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (b, t), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            labels: Tensor::from_vec(labels, n, device)?,
            loss_tokens: n,
            tokens,
        })
    }
}

/// The summed cross-entropy (in nats) of the batch's targets, a scalar in the graph: divide by
/// the number of target tokens of the optimizer step for the mean.
///
/// # Errors
/// Model and shape errors.
pub fn loss_sum<M: CausalLm + ?Sized>(model: &M, batch: &Batch) -> Result<Tensor> {
    targets_loss(model, batch, true)
}

/// [`loss_sum`], with `grad` false for a loss nothing will differentiate (evaluation): the LM
/// head then skips the gradients it would otherwise prepare.
pub(crate) fn targets_loss<M: CausalLm + ?Sized>(
    model: &M,
    batch: &Batch,
    grad: bool,
) -> Result<Tensor> {
    let hidden = model.hidden_states(&batch.inputs)?;
    let (b, t, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((b * t, h))?
        .index_select(&batch.positions, 0)?;
    let detached = |x: &Tensor| if grad { x.clone() } else { x.detach() };
    if let Some(w) = model.lm_head_weight() {
        return Ok(lora_runtime::ops::linear_cross_entropy_sum(
            &detached(&picked),
            &detached(w),
            &batch.labels,
        )?);
    }
    let logits = model.logits(&picked)?.to_dtype(DType::F32)?;
    Ok(lora_runtime::ops::cross_entropy_sum(
        &logits,
        &batch.labels,
    )?)
}
