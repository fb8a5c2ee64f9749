use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = ["q_proj"], rank = 16)]
struct Attention {
    q_proj: Linear,
}

fn main() {}
