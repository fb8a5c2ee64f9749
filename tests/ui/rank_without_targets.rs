use lora::prelude::*;

#[lora(rank = 8)]
struct Layer {
    #[lora(nested)]
    inner: Vec<LoraLinear>,
}

fn main() {}
