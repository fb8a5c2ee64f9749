use lora::prelude::*;

#[lora]
struct Layer<M> {
    #[lora(nested)]
    inner: Vec<M>,
}

fn merge_all(model: &mut impl LoraModel) {
    let _ = model.merge();
}

fn use_it() {
    merge_all(&mut Layer::<String> { inner: Vec::new() });
}

fn main() {}
