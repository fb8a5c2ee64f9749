use lora::prelude::*;

#[lora]
struct Empty;

fn main() {}
