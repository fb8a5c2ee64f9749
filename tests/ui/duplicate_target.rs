use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = ["q_proj", "v_proj", "q_proj"])]
struct Attention {
    q_proj: Linear,
    v_proj: Linear,
}

fn main() {}
