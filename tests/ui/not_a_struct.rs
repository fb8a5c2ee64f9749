use lora::prelude::*;

#[lora]
fn model() {}

fn main() {}
