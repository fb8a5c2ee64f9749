use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 0, targets = ["q_proj", "k_prj"])]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
}

fn main() {}
