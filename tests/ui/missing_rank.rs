use candle_nn::Linear;
use lora::prelude::*;

#[lora(alpha = 16, targets = ["q_proj"])]
struct Attention {
    q_proj: Linear,
}

fn main() {}
