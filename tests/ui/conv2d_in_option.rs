use candle_nn::Conv2d;
use lora::prelude::*;

// A target is the layer itself: a layer that may be absent goes in a nested `#[lora]` struct.
#[lora(rank = 4, targets = ["stem", "head"])]
struct Backbone {
    stem: Conv2d,
    head: Option<Conv2d>,
}

fn main() {}
