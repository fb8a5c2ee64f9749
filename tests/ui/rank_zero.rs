use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 0, targets = ["q_proj"])]
struct Attention {
    q_proj: Linear,
}

fn main() {}
