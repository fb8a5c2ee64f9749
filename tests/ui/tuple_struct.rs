use candle_nn::Linear;
use lora::prelude::*;

#[lora(rank = 8, targets = ["0"])]
struct Attention(Linear, Linear);

fn main() {}
