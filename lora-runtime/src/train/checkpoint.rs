//! Activation checkpointing: a block's forward runs without keeping its intermediate tensors,
//! and runs again, recording them, when the backward pass reaches it.
//!
//! Memory then holds each block's input instead of every activation of every block: on a
//! decoder this is the difference between `layers x (attention scores + MLP activations)` and
//! `layers x hidden states` plus one block's worth. The price is one more forward per block.
//!
//! candle has no hook for this, so the block becomes a custom op on its input: its forward
//! returns the output computed with the graph dropped, and its backward recomputes the block
//! from a fresh leaf, back-propagates the incoming gradient through it, returns the input's
//! gradient and hands the parameters' gradients to a [`GradSink`] (a custom op can only return
//! gradients for its arguments), which [`Trainer`](super::Trainer) adds in. The dropout
//! generator is rewound for the recomputation, so it draws the same masks as the forward did.
//!
//! CPU and CUDA; the recomputation itself runs whatever the block runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

use crate::rng::DropoutRng;

/// Gradients of parameters computed inside checkpointed blocks, waiting for the trainer.
#[derive(Debug, Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl GradSink {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<TensorId, Tensor>) -> T) -> T {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut map)
    }

    /// Adds `grad` to what is held for `id`.
    fn add(&self, id: TensorId, grad: Tensor) -> candle_core::Result<()> {
        self.with(|m| {
            let sum = match m.remove(&id) {
                Some(g) => (g + grad)?,
                None => grad,
            };
            m.insert(id, sum);
            Ok(())
        })
    }

    /// Takes what is held for `var`.
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.with(|m| m.remove(&var.as_tensor().id()))
    }

    /// Drops everything held.
    pub fn clear(&self) {
        self.with(HashMap::clear);
    }
}

/// What a model needs to checkpoint its blocks: the trained variables (whose gradients go to
/// the sink), the sink, and the dropout generator to rewind.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    vars: Arc<Vec<Var>>,
    sink: GradSink,
    dropout: Option<DropoutRng>,
}

/// A block's forward, run again in the backward pass.
type Block = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

impl Checkpointing {
    /// Checkpointing for a run training `vars`, with the model's dropout generator if it has one.
    pub fn new(vars: Vec<Var>, dropout: Option<DropoutRng>) -> Self {
        Self {
            vars: Arc::new(vars),
            sink: GradSink::default(),
            dropout,
        }
    }

    /// Where the parameters' gradients go (hand it to
    /// [`Trainer::set_grad_sink`](super::Trainer::set_grad_sink)).
    pub fn sink(&self) -> &GradSink {
        &self.sink
    }

    /// `block(x)`, checkpointed: the value is the same, the graph keeps only `x`.
    ///
    /// # Errors
    /// What `block` returns.
    pub fn run(
        &self,
        x: &Tensor,
        block: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> candle_core::Result<Tensor> {
        let state = self.dropout.as_ref().map(DropoutRng::state);
        // The output alone: the graph through the block is dropped with its temporaries.
        let y = block(&x.detach())?.detach().copy()?;
        // The op must be recorded even when `x` needs no gradient (the first block of a LoRA
        // model), or the backward would never reach the block's adapters.
        let x = if x.track_op() {
            x.clone()
        } else {
            Var::from_tensor(x)?.into_inner()
        };
        x.apply_op1(Recompute {
            y: Mutex::new(Some(y)),
            block: Arc::new(block),
            checkpointing: self.clone(),
            state,
        })
    }
}

/// The custom op standing for a checkpointed block.
struct Recompute {
    /// The block's output, computed once in the forward; taken by the op's forward, which
    /// returns a copy as the op's value (so one copy of each block's output lives on).
    y: Mutex<Option<Tensor>>,
    block: Block,
    checkpointing: Checkpointing,
    /// The dropout generator's state before the forward.
    state: Option<[u64; 4]>,
}

impl Recompute {
    /// The block's output, once (the op's forward runs once).
    fn take_output(&self) -> candle_core::Result<Tensor> {
        self.y
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::msg("checkpoint: the block's output was taken"))
    }

    /// A copy of the block's output storage (`pick`: the device's storage).
    fn output<S: Clone>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let y = self.take_output()?;
        let (storage, _) = y.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| {
            candle_core::Error::msg("checkpoint: the block's output is on another device")
        })?;
        Ok((s.clone(), y.shape().clone()))
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "lora-checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(c) => Ok((c.try_clone(layout)?, y.shape().clone())),
            _ => Err(candle_core::Error::msg(
                "checkpoint: the block's output is on another device",
            )),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let leaf = Var::from_tensor(&x.detach())?;
        let ck = &self.checkpointing;
        // Rewind the dropout generator to draw the forward's masks, then put it back.
        let resume = match (&ck.dropout, self.state) {
            (Some(d), Some(state)) => {
                let now = d.state();
                d.set_state(state);
                Some((d, now))
            }
            _ => None,
        };
        let y = (self.block)(leaf.as_tensor());
        if let Some((d, now)) = resume {
            d.set_state(now);
        }
        let grads = (y? * grad.detach())?.sum_all()?.backward()?;
        // Detached: candle's gradients can carry a graph back into the recomputed block (a
        // matmul's gradient is a product with its forward operand), which would keep every
        // block's recomputed activations alive in the sink until the optimizer step.
        for var in ck.vars.iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                ck.sink.add(var.as_tensor().id(), g.detach())?;
            }
        }
        Ok(grads.get(leaf.as_tensor()).map(Tensor::detach))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// A block with a parameter and dropout: checkpointed and plain give the same value and the
    /// same gradients, for the input and for the parameter.
    #[test]
    fn checkpointed_gradients_equal_the_plain_ones() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 6), &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap()).unwrap();
        let rng = DropoutRng::new(9);
        let block = {
            let (w, rng) = (w.as_tensor().clone(), rng.clone());
            move |x: &Tensor| -> candle_core::Result<Tensor> {
                let h = rng.dropout(&x.matmul(&w)?.tanh()?, 0.3)?;
                crate::ops::softmax_last_dim(&h.matmul(&w)?)
            }
        };
        let k = Tensor::randn(0f32, 1.0, (3, 6), &dev).unwrap();
        let state = rng.state();
        let plain = block(x.as_tensor()).unwrap();
        let g_plain = (&plain * &k)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        rng.set_state(state);
        let ck = Checkpointing::new(vec![w.clone()], Some(rng.clone()));
        let y = ck.run(x.as_tensor(), block).unwrap();
        let diff = (&y - &plain).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let after_forward = rng.state();
        let g = (&y * &k).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            rng.state(),
            after_forward,
            "the backward leaves the generator where it was"
        );
        let gx = g.get(x.as_tensor()).unwrap();
        let gw = ck.sink().take(&w).unwrap();
        assert!(g.get(w.as_tensor()).is_none());
        for (a, b) in [
            (gx, g_plain.get(x.as_tensor()).unwrap()),
            (&gw, g_plain.get(w.as_tensor()).unwrap()),
        ] {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "{d}");
        }
        // An input that tracks nothing still gets the parameter's gradient.
        let plain_x = x.as_tensor().detach();
        let y = ck.run(&plain_x, move |x| x.sum_keepdim(D::Minus1)).unwrap();
        assert!(y.track_op());
    }
}
