//! [`FrozenLinear`]: a linear layer that never trains, for the layers of a model that get no
//! adapter: its backward computes the input's gradient only, never the weight's.
//!
//! candle's `Linear` computes its weight's gradient in every backward pass even when nothing
//! trains it; in a LoRA model most linear layers are frozen, so that is most of the backward's
//! matmuls wasted. Hold such layers as `FrozenLinear` (built from a `Linear` with `.into()`); the
//! model's forward stays the same.
//!
//! ```
//! use candle_core::{Device, Module, Tensor, Var};
//! use candle_nn::Linear;
//! use lora_runtime::FrozenLinear;
//!
//! let w = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 4), &Device::Cpu)?)?;
//! let frozen = FrozenLinear::from(Linear::new(w.as_tensor().clone(), None));
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4), &Device::Cpu)?)?;
//! let grads = frozen.forward(x.as_tensor())?.sum_all()?.backward()?;
//! assert!(grads.get(x.as_tensor()).is_some());
//! assert!(grads.get(w.as_tensor()).is_none()); // no weight gradient
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::kernels;

/// A linear layer `x W^T + b` whose weight and bias never get a gradient.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl From<Linear> for FrozenLinear {
    fn from(linear: Linear) -> Self {
        Self {
            weight: linear.weight().clone(),
            bias: linear.bias().cloned(),
        }
    }
}

impl FrozenLinear {
    /// A layer from a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (weight, bias) = (self.weight.detach(), self.bias.as_ref().map(Tensor::detach));
        if x.track_op() {
            // Training: the custom op, whose backward computes the input's gradient only.
            kernels::frozen_linear(x, &weight, bias.as_ref())
        } else {
            // Nothing to differentiate: candle's own matmul (no custom-op overhead).
            Linear::new(weight, bias).forward(x)
        }
    }
}
