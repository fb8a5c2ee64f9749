use candle_nn::{Embedding, Linear};
use lora::prelude::*;

#[lora(rank = 8, targets = ["embed_tokens", "lm_head"])]
struct Model {
    #[lora(nested)]
    embed_tokens: Embedding,
    lm_head: Linear,
}

fn main() {}
