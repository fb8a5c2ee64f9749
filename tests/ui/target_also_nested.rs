use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = ["q_proj"])]
struct Attention {
    #[lora(nested)]
    q_proj: Linear,
}

fn main() {}
