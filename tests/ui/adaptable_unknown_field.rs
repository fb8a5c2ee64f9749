use candle_nn::Linear;
use lora::prelude::*;

#[lora(adaptable = ["q_proj", "o_prj"])]
struct Attention {
    q_proj: Linear,
    o_proj: Linear,
}

fn main() {}
