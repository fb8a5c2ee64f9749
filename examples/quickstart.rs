//! The whole story on a toy model: annotate, add an adapter, train it, save it, load it into a
//! freshly built model, merge, unmerge. Runs in a second on CPU: `cargo run --example quickstart`.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, AdamW, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use lora::prelude::*;

/// A two-layer MLP; `#[lora]` makes both layers `LoraLinear`s with rank-4 adapters.
#[lora(rank = 4, alpha = 8, targets = ["fc1", "fc2"])]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// Built as usual; each target is converted from its `Linear` with `.into()`.
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(16, 32, vb.pp("fc1"))?.into(),
            fc2: linear(32, 8, vb.pp("fc2"))?.into(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

fn main() -> Result<()> {
    run().map(|_| ())
}

/// Runs the story; returns the training loss at the first and at the last step.
pub fn run() -> Result<(f32, f32)> {
    let dev = Device::Cpu;
    let base = VarMap::new(); // the pre-trained weights would be loaded into this
    let mut model = Mlp::new(VarBuilder::from_varmap(&base, DType::F32, &dev))?;
    model.init_adapter(&VarMap::new())?; // B = 0: the model is unchanged until trained
    println!("{}", model.trainable_parameters());

    // Train only the adapters (A and B of fc1 and fc2) on a synthetic regression task.
    let x = Tensor::randn(0f32, 1.0, (64, 16), &dev)?;
    let y = x.matmul(&Tensor::randn(0f32, 0.3, (16, 8), &dev)?)?;
    let mut opt = AdamW::new(model.trainable_vars(), ParamsAdamW::default())?;
    opt.set_learning_rate(1e-2);
    let mut losses = Vec::new();
    for _ in 0..50 {
        let loss = candle_nn::loss::mse(&model.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()?);
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    println!("trained 50 steps: loss {first:.4} -> {last:.4}");

    // Save the adapter (PEFT format) and load it into a freshly built model on the same base.
    let dir = std::env::temp_dir().join(format!("lora-quickstart-{}", std::process::id()));
    model.save_adapter(&dir)?;
    let mut fresh = Mlp::new(VarBuilder::from_varmap(&base, DType::F32, &dev))?;
    fresh.load_adapter(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    let y_trained = model.forward(&x)?;
    ensure!(fresh.forward(&x)?.to_vec2::<f32>()? == y_trained.to_vec2::<f32>()?);
    println!("saved to and loaded from {}: same outputs", dir.display());

    // Merge: W += (alpha / r) B A, so the forward costs what the base's does. Unmerge restores W.
    let w = model.fc1.weight()?.to_vec2::<f32>()?;
    model.merge()?;
    let diff = (model.forward(&x)? - &y_trained)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(model.is_merged());
    ensure!(diff < 1e-4, "merged output off by {diff}");
    model.unmerge()?;
    ensure!(!model.is_merged() && model.fc1.weight()?.to_vec2::<f32>()? == w);
    println!("merged: outputs within {diff:.1e}; unmerged: fc1's weight back bit for bit");
    Ok((first, last))
}
