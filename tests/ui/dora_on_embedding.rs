use candle_nn::{Embedding, Linear};
use lora::prelude::*;

#[lora(rank = 4, dora, targets = ["embed_tokens", "proj"])]
struct Model {
    embed_tokens: Embedding,
    proj: Linear,
}

fn main() {}
