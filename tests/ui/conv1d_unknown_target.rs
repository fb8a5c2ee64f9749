use candle_nn::Conv1d;
use lora::prelude::*;

#[lora(rank = 4, targets = ["conv1", "conv_2"])]
struct Encoder {
    conv1: Conv1d,
    conv2: Conv1d,
}

fn main() {}
