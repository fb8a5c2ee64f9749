//! # lora
//!
//! LoRA (Low-Rank Adaptation, Hu et al. 2022) for [candle](https://github.com/huggingface/candle)
//! models: add one attribute to your model struct and its linear layers get trainable low-rank
//! adapters, exact merge/unmerge, and adapter files in Hugging Face PEFT's format.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{linear_no_bias, Linear, VarBuilder, VarMap};
//! use lora::prelude::*;
//!
//! #[lora(rank = 4, alpha = 8, targets = ["q_proj", "v_proj"])]
//! struct Attention { q_proj: Linear, k_proj: Linear, v_proj: Linear }
//!
//! let dev = Device::Cpu;
//! let base = VarMap::new();
//! let vb = VarBuilder::from_varmap(&base, DType::F32, &dev);
//! let mut attn = Attention {
//!     q_proj: linear_no_bias(16, 16, vb.pp("q_proj"))?.into(),
//!     k_proj: linear_no_bias(16, 16, vb.pp("k_proj"))?,
//!     v_proj: linear_no_bias(16, 16, vb.pp("v_proj"))?.into(),
//! };
//! let adapters = VarMap::new();
//! attn.init_adapter(&adapters)?;
//! assert_eq!(attn.trainable_vars().len(), 4); // A and B of q_proj and v_proj, nothing else
//! let x = Tensor::randn(0f32, 1., (2, 16), &dev)?;
//! let _y = attn.q_proj.forward(&x)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub use lora_macros::lora;
pub use lora_runtime::*;

/// The candle this crate is built on, so users need no separate (and possibly mismatched)
/// dependency: `lora::candle::Tensor`, `lora::candle_nn::Linear`.
pub use candle_core as candle;
pub use candle_nn;

/// Pretrained model families written with `#[lora]` (a Llama-family decoder, GGUF and Hugging
/// Face loading, generation): the `lora-models` crate.
pub use lora_models as models;

/// The names most users need: `use lora::prelude::*;`.
pub mod prelude {
    pub use lora_macros::lora;
    pub use lora_runtime::{
        Combination, InitOptions, LayerConfig, LoadOptions, LoraConfig, LoraConv1d, LoraConv2d,
        LoraEmbedding, LoraInit, LoraLinear, LoraModel, LoraModelExt, TrainableParameters,
    };
}
