use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = [])]
struct Attention {
    q_proj: Linear,
}

fn main() {}
