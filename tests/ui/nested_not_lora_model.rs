use candle_nn::Linear;
use lora::prelude::*;

struct Mlp {
    up: Linear,
}

#[lora]
struct Layer {
    #[lora(nested)]
    mlps: Vec<Mlp>,
}

fn main() {}
