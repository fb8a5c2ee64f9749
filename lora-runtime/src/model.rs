//! [`LoraModel`]: the seam between `#[lora]` and the runtime.
//!
//! A model implements two visitors (shared and mutable) that hand every LoRA layer to a callback
//! together with its module path and hyper-parameters; `#[lora]` writes them. That is all a model
//! is to the runtime: the verbs (`init_adapter`, `merge`, `save_adapter`, ...) are on
//! [`LoraModelExt`](crate::LoraModelExt), implemented for every `LoraModel`, each a call into the
//! module that does the work.
//!
//! This module also holds the two helpers those modules share: `layers` (every layer with its
//! path) and `prepare_then_commit`, the one place where "check every layer, then change every
//! layer" is written.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_nn::VarMap;
//! use lora_runtime::{LayerConfig, LoraLinear, LoraModel, LoraModelExt, ModulePath, VisitFn, VisitMutFn};
//!
//! // What `#[lora(rank = 4, alpha = 8, targets = ["q_proj"])]` generates, by hand.
//! struct Attention { q_proj: LoraLinear }
//! const CONFIG: LayerConfig = LayerConfig::new(4, 8.0);
//! impl LoraModel for Attention {
//!     fn visit_lora_layers<'a>(&'a self, path: &mut ModulePath, f: &mut VisitFn<'a, '_>) -> lora_runtime::Result<()> {
//!         path.scoped("q_proj", |p| f(p, &self.q_proj, Some(&CONFIG)))
//!     }
//!     fn visit_lora_layers_mut(&mut self, path: &mut ModulePath, f: &mut VisitMutFn<'_>) -> lora_runtime::Result<()> {
//!         path.scoped("q_proj", |p| f(p, &mut self.q_proj, Some(&CONFIG)))
//!     }
//! }
//!
//! let w = Tensor::randn(0f32, 1., (8, 8), &Device::Cpu)?;
//! let mut layers = vec![Attention { q_proj: LoraLinear::new(w.clone(), None) },
//!                       Attention { q_proj: LoraLinear::new(w, None) }];
//! let varmap = VarMap::new();
//! layers.init_adapter(&varmap)?;
//! assert_eq!(layers.trainable_vars().len(), 4);
//! let paths: Vec<String> = layers.lora_layers().into_iter().map(|(p, _, _)| p).collect();
//! assert_eq!(paths, ["0.q_proj", "1.q_proj"]);
//! assert_eq!(
//!     layers.trainable_parameters().to_string(),
//!     "trainable params: 128 || all params: 256 || trainable%: 50.0000"
//! );
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use std::fmt;

use crate::config::LayerConfig;
use crate::error::{LayerResult, Result};
use crate::layer::{LoraConv1d, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear};

/// The dotted module path of a layer, e.g. `model.layers.0.self_attn.q_proj`, as PyTorch names it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModulePath(String);

impl ModulePath {
    /// The empty path (the model's root).
    pub fn new() -> Self {
        Self::default()
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Runs `f` with `segment` appended, then removes it again.
    pub fn scoped<R>(&mut self, segment: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        let len = self.0.len();
        if !self.0.is_empty() {
            self.0.push('.');
        }
        self.0.push_str(segment);
        let out = f(self);
        self.0.truncate(len);
        out
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ModulePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The callback of [`LoraModel::visit_lora_layers`]: module path, layer, and the hyper-parameters
/// of its default adapter (`#[lora(targets = ..)]`), `None` for a layer that only takes
/// adapters created at run time (`#[lora(adaptable = ..)]`).
pub type VisitFn<'a, 'f> =
    dyn FnMut(&ModulePath, &'a dyn LoraLayer, Option<&LayerConfig>) -> Result<()> + 'f;

/// The callback of [`LoraModel::visit_lora_layers_mut`].
pub type VisitMutFn<'f> =
    dyn FnMut(&ModulePath, &mut dyn LoraLayer, Option<&LayerConfig>) -> Result<()> + 'f;

/// A model with LoRA layers: two visitors, which `#[lora]` implements. The verbs are on
/// [`LoraModelExt`](crate::LoraModelExt).
///
/// # Concurrency
///
/// Models are `Send + Sync` (their tensors are reference-counted and immutable), so threads can
/// run forwards on one shared `&model` and get exactly the single-threaded results. Everything
/// that changes a model (`merge`, `unmerge`, `load_adapter`, `init_adapter`, ...) takes
/// `&mut self`, so it cannot run while any thread reads the model:
///
/// ```compile_fail,E0502
/// # use candle_core::{DType, Device, Module, Tensor};
/// # use lora_runtime::{LoraLinear, LoraModelExt};
/// # let w = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
/// let mut model = LoraLinear::new(w.clone(), None);
/// std::thread::scope(|s| {
///     s.spawn(|| model.forward(&w));
///     model.merge() // error[E0502]: cannot borrow `model` as mutable, it is borrowed by the thread
/// });
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a LoRA model",
    label = "`{Self}` has no `#[lora]` attribute",
    note = "add `#[lora]` to the definition of `{Self}`, or remove `#[lora(nested)]` from this field"
)]
pub trait LoraModel {
    /// Calls `f` on every LoRA layer, with its full module path (below `path`) and
    /// hyper-parameters, in a fixed order.
    ///
    /// # Errors
    /// The first error `f` returns.
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()>;

    /// Mutable twin of [`visit_lora_layers`](Self::visit_lora_layers), in the same order.
    ///
    /// # Errors
    /// The first error `f` returns.
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()>;
}

/// Every LoRA layer of `model` with its module path and hyper-parameters, in visiting order.
pub(crate) fn layers<M: LoraModel + ?Sized>(
    model: &M,
) -> Vec<(String, &dyn LoraLayer, Option<LayerConfig>)> {
    let mut out = Vec::new();
    // The callback never fails, so neither does the visit of a correct model; a hand-written
    // visitor that fails on its own yields the layers visited so far.
    let _ = model.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, c| {
        out.push((p.to_string(), l, c.copied()));
        Ok(())
    });
    out
}

/// The all-or-nothing rule of every operation that changes several layers, written once.
///
/// Phase one visits every layer immutably and calls `prepare(path, layer, config)`, which checks the
/// layer and computes what the change needs (a merged weight, a fresh adapter, ...) without
/// changing anything: `Ok(None)` leaves the layer alone. A failure stops there and is returned
/// with the layer's module path attached, so the model is exactly as it was. Phase two visits
/// every layer mutably, in the same order, and hands each its prepared value to `commit`, which
/// cannot fail. Returns how many layers were prepared.
///
/// # Errors
/// The first error of `prepare`, at its layer's path.
pub(crate) fn prepare_then_commit<M, P>(
    model: &mut M,
    mut prepare: impl FnMut(&str, &dyn LoraLayer, Option<&LayerConfig>) -> LayerResult<Option<P>>,
    mut commit: impl FnMut(&mut dyn LoraLayer, P),
) -> Result<usize>
where
    M: LoraModel + ?Sized,
{
    let mut prepared: Vec<Option<P>> = Vec::new();
    model.visit_lora_layers(&mut ModulePath::new(), &mut |p, l, c| {
        prepared.push(prepare(p.as_str(), l, c).map_err(|e| e.at(p.as_str()))?);
        Ok(())
    })?;
    let count = prepared.iter().flatten().count();
    let mut prepared = prepared.into_iter();
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
        if let Some(Some(value)) = prepared.next() {
            commit(l, value);
        }
        Ok(())
    })?;
    Ok(count)
}

/// `f` over `items` on up to candle's thread count of threads, results in order: for per-layer
/// work that is independent and memory-bound (hashing base weights).
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = candle_core::utils::get_num_threads().clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(results) => results,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// The adapter names of every layer, sorted and deduplicated.
pub(crate) fn adapter_names<M: LoraModel + ?Sized>(model: &M) -> Vec<String> {
    let mut names: Vec<String> = layers(model)
        .iter()
        .flat_map(|(_, l, _)| l.adapter_names().into_iter().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A layer on its own is a model with one layer at the root path, whose default adapter has
/// PEFT's default hyper-parameters.
macro_rules! layer_is_a_model {
    ($($layer:ty),*) => {$(
        impl LoraModel for $layer {
            fn visit_lora_layers<'a>(&'a self, path: &mut ModulePath, f: &mut VisitFn<'a, '_>) -> Result<()> {
                f(path, self, Some(&LayerConfig::default()))
            }
            fn visit_lora_layers_mut(&mut self, path: &mut ModulePath, f: &mut VisitMutFn<'_>) -> Result<()> {
                f(path, self, Some(&LayerConfig::default()))
            }
        }
    )*};
}

layer_is_a_model!(LoraLinear, LoraEmbedding, LoraConv1d, LoraConv2d);

impl<T: LoraModel> LoraModel for Option<T> {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        match self {
            Some(inner) => inner.visit_lora_layers(path, f),
            None => Ok(()),
        }
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        match self {
            Some(inner) => inner.visit_lora_layers_mut(path, f),
            None => Ok(()),
        }
    }
}

impl<T: LoraModel + ?Sized> LoraModel for Box<T> {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        (**self).visit_lora_layers(path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        (**self).visit_lora_layers_mut(path, f)
    }
}

/// List elements take their index as path segment, like PyTorch's `ModuleList`.
fn visit_slice<'a, T: LoraModel>(
    items: &'a [T],
    path: &mut ModulePath,
    f: &mut VisitFn<'a, '_>,
) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        path.scoped(&i.to_string(), |p| item.visit_lora_layers(p, f))?;
    }
    Ok(())
}

fn visit_slice_mut<T: LoraModel>(
    items: &mut [T],
    path: &mut ModulePath,
    f: &mut VisitMutFn<'_>,
) -> Result<()> {
    for (i, item) in items.iter_mut().enumerate() {
        path.scoped(&i.to_string(), |p| item.visit_lora_layers_mut(p, f))?;
    }
    Ok(())
}

impl<T: LoraModel> LoraModel for Vec<T> {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        visit_slice(self, path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        visit_slice_mut(self, path, f)
    }
}

impl<T: LoraModel, const N: usize> LoraModel for [T; N] {
    fn visit_lora_layers<'a>(
        &'a self,
        path: &mut ModulePath,
        f: &mut VisitFn<'a, '_>,
    ) -> Result<()> {
        visit_slice(self, path, f)
    }
    fn visit_lora_layers_mut(
        &mut self,
        path: &mut ModulePath,
        f: &mut VisitMutFn<'_>,
    ) -> Result<()> {
        visit_slice_mut(self, path, f)
    }
}
