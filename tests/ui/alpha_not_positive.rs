use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, alpha = -16, targets = ["q_proj"])]
struct Attention {
    q_proj: Linear,
}

fn main() {}
