use lora::prelude::*;

#[lora]
union Bits {
    int: u32,
    float: f32,
}

fn main() {}
