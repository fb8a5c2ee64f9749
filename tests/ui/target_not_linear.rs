use candle_nn::{LayerNorm, Linear};
use lora::prelude::*;

#[lora(rank = 8, targets = ["norm", "q_proj"])]
struct Model {
    norm: LayerNorm,
    q_proj: Linear,
}

fn main() {}
