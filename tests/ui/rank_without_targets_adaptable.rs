use candle_nn::Linear;
use lora::prelude::*;

// `adaptable` layers have no default adapter, so a rank would do nothing.
#[lora(rank = 8, adaptable = ["q_proj"])]
struct Attention {
    q_proj: Linear,
}

fn main() {}
