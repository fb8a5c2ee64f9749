use lora::prelude::*;

#[lora]
struct Layer {
    #[lora(nestd)]
    inner: Vec<LoraLinear>,
}

fn main() {}
