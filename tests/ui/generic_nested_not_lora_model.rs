use lora::prelude::*;

#[lora]
struct Layer<M> {
    #[lora(nested)]
    inner: Vec<M>,
}

/// Not a LoRA model. (A local type keeps the message stable: how rustc abbreviates a std path
/// such as `String` depends on every crate in the dependency graph.)
struct Tokenizer;

fn merge_all(model: &mut impl LoraModel) {
    let _ = model.merge();
}

fn use_it() {
    merge_all(&mut Layer::<Tokenizer> { inner: Vec::new() });
}

fn main() {}
