use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = ["q_proj"], adaptable = ["q_proj", "k_proj"])]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
}

fn main() {}
