//! A user's model, written against `lora` alone.

use lora::prelude::*;

/// Adapters on `q_proj` and `v_proj`.
#[lora(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"])]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub v_proj: LoraLinear,
}

/// A container.
#[lora]
pub struct Model {
    #[lora(nested)]
    pub layers: Vec<Attention>,
}

/// The module paths of the model's LoRA layers.
pub fn paths(model: &Model) -> Vec<String> {
    model
        .lora_layers()
        .into_iter()
        .map(|(path, _, _)| path)
        .collect()
}
