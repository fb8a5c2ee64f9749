use candle_nn::{Embedding, Linear};
use lora::prelude::*;

#[lora(adaptable = ["embed", "q_proj"])]
struct Model {
    embed: Embedding,
    q_proj: Linear,
}

fn main() {}
