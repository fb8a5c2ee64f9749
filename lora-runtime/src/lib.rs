//! The runtime behind the [`lora`](https://docs.rs/lora) crate: LoRA layers on candle, exact
//! merge and unmerge, and adapter files in Hugging Face PEFT's format.
//!
//! Most users depend on `lora` and write `#[lora(...)]` on their model struct; this crate is what
//! the generated code calls. It can be used directly:
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::{Linear, VarMap};
//! use lora_runtime::{InitOptions, LayerConfig, LoraLinear, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let mut layer = LoraLinear::from(Linear::new(Tensor::randn(0f32, 1., (16, 16), &dev)?, None));
//! let options = InitOptions::default().with_config(LayerConfig::new(4, 8.0)).with_seed(42);
//! layer.init_adapter_with(&VarMap::new(), &options)?; // one layer is a model of its own
//! let x = Tensor::randn(0f32, 1., (2, 16), &dev)?;
//! let unmerged = layer.forward(&x)?;
//! layer.merge()?;                  // W += (alpha / r) * B A, computed in f32
//! let merged = layer.forward(&x)?; // one matmul, same output
//! assert!((unmerged - merged)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
//! layer.unmerge()?;                // the original W, bit for bit
//! # Ok::<(), lora_runtime::Error>(())
//! ```
//!
//! - [`LoraLinear`]: a frozen linear layer plus named adapters; [`LoraLayer`]: what every layer
//!   kind implements.
//! - [`LoraModel`]: the two visitors `#[lora]` implements; [`LoraModelExt`]: the verbs (merge,
//!   save, load, ...) every model gets.
//! - [`LayerConfig`], [`LoraConfig`]: hyper-parameters; PEFT's `adapter_config.json`.
//! - [`peft`]: reading and writing PEFT adapter directories.
//! - [`merge_file`]: merging an adapter into a safetensors model without model code (the `lora`
//!   command-line tool).
//!
//! Modules depend on each other in one direction, each only on those before it:
//! `error` -> `layout` -> `config` -> `rng` -> `fingerprint` -> `adapter` -> `kernels`, `ops` -> `routing` -> `layer` ->
//! `model` -> `fs` -> `peft` -> `registry` -> `merge`, `combine`, `batched` -> `ext` ->
//! `train`, `merge_file`.
#![warn(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod adapter;
pub mod batched;
pub mod combine;
pub mod config;
pub mod decompose;
pub mod error;
pub mod ext;
pub mod fingerprint;
mod fs;
mod kernels;
pub mod layer;
pub mod layout;
pub mod merge;
pub mod merge_file;
pub mod model;
pub mod ops;
pub mod peft;
pub mod registry;
pub mod rng;
pub mod routing;
mod skinny;
pub mod train;

pub use adapter::{Adapter, AdapterSet, DEFAULT_ADAPTER};
pub use combine::Combination;
pub use config::{
    AdaLoraConfig, AdaLoraSchedule, LayerConfig, LoraConfig, LoraInit, TargetModules,
};
pub use error::{Error, Factor, LayerError, LayerResult, Result};
pub use ext::LoraModelExt;
pub use fingerprint::BaseFingerprint;
pub use fs::write_atomically;
pub use layer::{
    FrozenLinear, LoraConv1d, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, MergedWeight,
    QuantizedWeight,
};
pub use model::{LoraModel, ModulePath, VisitFn, VisitMutFn};
pub use peft::{LoadOptions, SaveOptions};
pub use registry::{InitOptions, TrainableParameters, DEFAULT_SEED};

/// What the code `#[lora]` generates calls. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::config::{LayerConfig, LoraInit};
    pub use crate::error::Result;
    pub use crate::layer::{LoraConv1d, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear};
    pub use crate::model::{LoraModel, ModulePath, VisitFn, VisitMutFn};

    /// The layer types a `#[lora]` target field may have, and the LoRA layer each becomes.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be a LoRA target",
        label = "not a layer LoRA can adapt",
        note = "LoRA layers must be `candle_nn::Linear`, `Embedding`, `Conv1d` or `Conv2d` (or `lora::LoraLinear`, `LoraEmbedding`, `LoraConv1d`, `LoraConv2d`): remove this field from `targets` / `adaptable`"
    )]
    pub trait LoraTarget {
        /// The LoRA layer a field of this type becomes.
        type Layer: LoraLayer;
    }
    macro_rules! targets {
        ($($base:ty => $layer:ty),* $(,)?) => {$(
            impl LoraTarget for $base {
                type Layer = $layer;
            }
        )*};
    }
    targets! {
        candle_nn::Linear => LoraLinear,
        LoraLinear => LoraLinear,
        candle_nn::Embedding => LoraEmbedding,
        LoraEmbedding => LoraEmbedding,
        candle_nn::Conv1d => LoraConv1d,
        LoraConv1d => LoraConv1d,
        candle_nn::Conv2d => LoraConv2d,
        LoraConv2d => LoraConv2d,
    }

    /// Fails to compile, at the field's type, when it is not a supported target layer or does
    /// not become the layer `L` the macro chose for it.
    #[inline(always)]
    pub const fn assert_lora_target<T: LoraTarget<Layer = L> + ?Sized, L>() {}

    /// Fails to compile, at the field's type, when a `#[lora(nested)]` field is not a LoRA model.
    #[inline(always)]
    pub const fn assert_lora_model<T: LoraModel + ?Sized>() {}

    /// Visits a target field.
    #[inline]
    pub fn visit_layer<'a, L: LoraLayer>(
        path: &mut ModulePath,
        name: &str,
        layer: &'a L,
        config: Option<&LayerConfig>,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        path.scoped(name, |p| f(p, layer, config))
    }

    /// Visits a target field mutably.
    #[inline]
    pub fn visit_layer_mut<L: LoraLayer>(
        path: &mut ModulePath,
        name: &str,
        layer: &mut L,
        config: Option<&LayerConfig>,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        path.scoped(name, |p| f(p, layer, config))
    }

    /// Visits a `#[lora(nested)]` field.
    #[inline]
    pub fn visit_nested<'a, T: LoraModel + ?Sized>(
        path: &mut ModulePath,
        name: &str,
        model: &'a T,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        path.scoped(name, |p| model.visit_lora_layers(p, f))
    }

    /// Visits a `#[lora(nested)]` field mutably.
    #[inline]
    pub fn visit_nested_mut<T: LoraModel + ?Sized>(
        path: &mut ModulePath,
        name: &str,
        model: &mut T,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        path.scoped(name, |p| model.visit_lora_layers_mut(p, f))
    }
}

/// Helpers for the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::Tensor;

    /// `max |a - b|`.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| {
                d.abs()?
                    .max_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_scalar()
            })
            .expect("tensors of one shape")
    }
}
