use candle_nn::Linear;
use lora::prelude::*;

#[lora]
enum Block {
    Dense(Linear),
    Identity,
}

fn main() {}
