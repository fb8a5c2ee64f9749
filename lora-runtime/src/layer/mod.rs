//! The layer kinds that carry adapters, behind one trait: [`LoraLayer`].
//!
//! Everything above the layers (the model visitor, PEFT files, merge, combinations, batching)
//! sees a layer only as `&dyn LoraLayer`. A new kind is a new file here with a struct that
//! implements the trait, as [`LoraEmbedding`] (`embedding.rs`) and [`LoraConv1d`] /
//! [`LoraConv2d`] (`conv.rs`) do; a kind whose factors are not the matrices `A [r, in]`,
//! `B [out, r]` says so through [`LoraLayer::factor_layout`] (a [`FactorLayout`]: shapes and
//! PEFT's names), which adapter creation, the shape checks and the PEFT files follow.
//!
//! Why a trait and not an enum of kinds: the set of layer kinds is open (users can write their
//! own, and each kind brings its own forward and its own factor layout), while what the runtime
//! needs of a layer is small and the same for all of them: its adapters, the shapes its factors
//! must have, a fingerprint of its frozen base, and a merge in two steps (compute, then install)
//! so that a whole model merges all-or-nothing. With an enum every new kind would add a match arm
//! in every module above; with the trait it adds one `impl`. What differs *within* a kind, such
//! as a dense or a quantized base weight, is the layer's own business.
//!
//! Methods report a [`LayerError`] without a module path: the model visitor knows the path and
//! attaches it once ([`LayerError::at`]).

mod conv;
mod embedding;
mod frozen;
mod linear;
mod quantized;
mod weight;

pub use conv::{LoraConv1d, LoraConv2d};
pub use embedding::LoraEmbedding;
pub use frozen::FrozenLinear;
pub use linear::LoraLinear;
pub use quantized::QuantizedWeight;

use std::any::Any;

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::{Adapter, AdapterSet, DEFAULT_ADAPTER};
use crate::config::LayerConfig;
use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::layout::{FactorLayout, FactorNames};
use crate::rng::DropoutRng;
use crate::routing::Routing;

/// A merged weight computed by [`LoraLayer::prepare_merge`], not yet installed.
#[derive(Debug, Clone)]
pub struct MergedWeight(pub(crate) Tensor);

impl MergedWeight {
    /// Wraps a merged weight a layer computed (for layer kinds outside this crate).
    pub fn new(weight: Tensor) -> Self {
        Self(weight)
    }
    /// The merged weight.
    pub fn into_tensor(self) -> Tensor {
        self.0
    }
}

/// A layer with a frozen base and named LoRA adapters: what the model visitor hands out.
///
/// Implementations keep an [`AdapterSet`] and say how their factors are shaped; the provided
/// methods do the rest. Changing methods are called by the runtime only after it checked the
/// whole model (no layer merged, every factor fits), so installing never fails half-way.
pub trait LoraLayer: Send + Sync + std::fmt::Debug + Any {
    /// Input features: the width of `A` (`[r, in]`); a convolution's input channels, an
    /// embedding's number of embeddings.
    fn in_features(&self) -> usize;
    /// Output features: the height of `B` (`[out, r]`); a convolution's output channels, an
    /// embedding's dimension.
    fn out_features(&self) -> usize;
    /// Whether the stored weight is `[in, out]` (PEFT's `fan_in_fan_out`, GPT-2's `Conv1D`).
    fn fan_in_fan_out(&self) -> bool {
        false
    }
    /// The dtype of this layer's adapter factors.
    fn adapter_dtype(&self) -> DType;
    /// The device of the layer's tensors.
    fn device(&self) -> &Device;
    /// The number of frozen parameters (weight and bias).
    fn base_parameters(&self) -> usize;
    /// The fingerprint of the unmerged base weight as stored (what adapter files record).
    ///
    /// # Errors
    /// A candle error when the weight cannot be read.
    fn base_fingerprint(&self) -> LayerResult<BaseFingerprint>;

    /// The adapters.
    fn adapter_set(&self) -> &AdapterSet;
    /// The adapters, to change. Check [`is_merged`](Self::is_merged) and the factors' shapes
    /// first: [`insert_adapter`](Self::insert_adapter) does both.
    fn adapter_set_mut(&mut self) -> &mut AdapterSet;

    /// Whether an adapter is folded into the weight.
    fn is_merged(&self) -> bool;
    /// Computes the merged weight `W + s B A` of the active adapter, checked to be finite,
    /// without changing the layer.
    ///
    /// # Errors
    /// [`LayerError::Merged`], [`LayerError::NoAdapter`], [`LayerError::NonFinite`].
    fn prepare_merge(&self) -> LayerResult<MergedWeight>;
    /// Installs a weight from [`prepare_merge`](Self::prepare_merge), keeping the original for
    /// an exact unmerge. Cannot fail.
    fn commit_merge(&mut self, merged: MergedWeight);
    /// Restores the weight from before the merge, bit for bit.
    ///
    /// # Errors
    /// [`LayerError::NotMerged`].
    fn revert_merge(&mut self) -> LayerResult<()>;
    /// After a merge: drops the original weight and every adapter, leaving a plain layer.
    fn unload(&mut self);

    /// Routes the rows of the next forwards through the adapters of a [`Routing`] (`None`:
    /// back to the active adapter).
    fn set_routing(&mut self, routing: Option<Routing>);
    /// Stacks this layer's adapters for a mixed-adapter batch (see [`Routing::new`]).
    ///
    /// # Errors
    /// [`LayerError::Merged`], [`LayerError::UnknownAdapter`].
    fn prepare_routing(&self, rows: &[Option<&str>]) -> LayerResult<Routing>;

    /// Whether the layer is in training mode (dropout on the LoRA branch).
    fn is_training(&self) -> bool;
    /// Switches training mode.
    fn set_training(&mut self, training: bool);
    /// Makes training-mode dropout draw its masks from `rng` (`None`: the layer's own default),
    /// so that a seeded run is reproducible. Layers without dropout ignore it.
    fn set_dropout_rng(&mut self, rng: Option<DropoutRng>) {
        let _ = rng;
    }

    /// Whether this layer kind implements DoRA (its forward and merge apply an adapter's
    /// magnitude). Kinds that do not are refused DoRA adapters rather than silently running them
    /// as plain LoRA.
    fn supports_dora(&self) -> bool {
        false
    }
    /// Whether this layer kind implements AdaLoRA (its forward and merge use an adapter's
    /// singular values `E`). Kinds that do not are refused AdaLoRA adapters.
    fn supports_adalora(&self) -> bool {
        false
    }
    /// DoRA's weight norm for `adapter` on this layer: `||W + s B A||` per output feature, f32
    /// `[out]`, computed from the unmerged base weight and detached (no gradient flows through
    /// it, as in PEFT and the DoRA paper, section 4.3).
    ///
    /// # Errors
    /// [`LayerError::Refused`] for a layer kind without DoRA; a candle error.
    fn dora_weight_norm(&self, adapter: &Adapter) -> LayerResult<Tensor> {
        let _ = adapter;
        Err(LayerError::dora_unsupported())
    }

    /// The layer as [`Any`], to reach its concrete type (see `downcast_ref` on `dyn LoraLayer`).
    fn as_any(&self) -> &dyn Any;
    /// The layer as mutable [`Any`], e.g. for a loader that sets up layers of a kind it knows.
    fn as_any_mut(&mut self) -> &mut dyn Any;

    /// The active adapter, if any.
    fn adapter(&self) -> Option<&Adapter> {
        self.adapter_set().active()
    }
    /// The adapter called `name`, active or not.
    fn adapter_named(&self, name: &str) -> Option<&Adapter> {
        self.adapter_set().get(name)
    }
    /// The names of this layer's adapters, sorted.
    fn adapter_names(&self) -> Vec<&str> {
        self.adapter_set().names()
    }
    /// The name of the active adapter (`None`: the base alone).
    fn active_adapter_name(&self) -> Option<&str> {
        self.adapter_set().active_name()
    }

    /// The shapes of this layer's factors for rank `rank`, and PEFT's names for them: by
    /// default a linear layer's, `A [r, in]` and `B [out, r]` as `lora_A` / `lora_B`. Kinds
    /// with other factors (convolutions, embeddings) override this; adapters, checks and files
    /// follow it.
    fn factor_layout(&self, rank: usize) -> FactorLayout {
        FactorLayout::matrix(self.in_features(), self.out_features(), rank)
    }

    /// PEFT's names for the factors of `adapter` on this layer: AdaLoRA's bare `lora_A` /
    /// `lora_E` / `lora_B` for an AdaLoRA adapter, else those of the layer's
    /// [`factor_layout`](Self::factor_layout).
    fn factor_names(&self, adapter: &Adapter) -> FactorNames {
        if adapter.is_adalora() {
            FactorNames::AdaLora
        } else {
            self.factor_layout(adapter.rank()).names()
        }
    }

    /// Checks that `A` and `B` of these shapes fit the layer's
    /// [`factor_layout`](Self::factor_layout): `A [r, in]`, `B [out, r]` for a linear layer.
    ///
    /// # Errors
    /// [`LayerError::FactorShape`] naming the factor that does not fit.
    fn check_factors(&self, a: &[usize], b: &[usize]) -> LayerResult<()> {
        let rank = a.first().copied().unwrap_or(0);
        self.factor_layout(rank).check(a, b)
    }

    /// A fresh adapter for this layer (see [`Adapter::fresh_for`]): `A` random in the
    /// layer's [`factor_layout`](Self::factor_layout), `B = 0`; with `config.use_dora`, its
    /// magnitude starts at the [weight norm](Self::dora_weight_norm), `||W||` per output feature
    /// since `B = 0`, as PEFT initialises it: the fresh adapter changes nothing.
    ///
    /// # Errors
    /// [`LayerError::InvalidConfig`] for invalid hyper-parameters, [`LayerError::Refused`] for
    /// DoRA on a layer kind without it.
    fn fresh_adapter(&self, config: &LayerConfig, seed: u64) -> LayerResult<Adapter> {
        if config.adalora.is_some() && !self.supports_adalora() {
            return Err(LayerError::adalora_unsupported());
        }
        let adapter = Adapter::fresh_for(
            &self.factor_layout(config.rank),
            config,
            seed,
            self.adapter_dtype(),
            self.device(),
        )?;
        if !config.use_dora {
            return Ok(adapter);
        }
        let norm = self.dora_weight_norm(&adapter)?;
        adapter.with_magnitude(Var::from_tensor(&norm.to_dtype(self.adapter_dtype())?)?)
    }

    /// A fresh adapter taken out of the layer's weight (PiSSA / OLoRA, when
    /// `config.init` is one: see [`decompose`](crate::decompose)) and the residual weight
    /// `W - s B A` that must replace the base for the output to stay the same; computed without
    /// changing the layer ([`install_residual`](Self::install_residual) installs it). Layer kinds
    /// without it refuse.
    ///
    /// # Errors
    /// [`LayerError::Refused`] on kinds without it, [`LayerError::InvalidConfig`] for another
    /// init or invalid hyper-parameters, [`LayerError::Merged`], [`LayerError::NonFinite`].
    fn fresh_decomposed(
        &self,
        config: &LayerConfig,
        seed: u64,
    ) -> LayerResult<(Adapter, MergedWeight)> {
        let _ = (config, seed);
        Err(LayerError::Refused(
            "PiSSA and OLoRA initialisation is supported on linear layers only".into(),
        ))
    }
    /// Makes a residual weight from [`fresh_decomposed`](Self::fresh_decomposed) the layer's
    /// frozen base from now on (its fingerprint changes with it: adapters saved afterwards apply
    /// to the residual base). Kinds that refuse `fresh_decomposed` are never asked.
    fn install_residual(&mut self, residual: MergedWeight) {
        let _ = residual;
    }

    /// Adds or replaces the adapter `name` after checking that the layer is not merged, that
    /// the factors fit and that a DoRA (AdaLoRA) adapter goes to a layer kind with DoRA
    /// (AdaLoRA). A mixed-adapter
    /// routing is cleared (it holds a snapshot of the factors).
    ///
    /// # Errors
    /// [`LayerError::Merged`], [`LayerError::FactorShape`], [`LayerError::Refused`].
    fn insert_adapter(&mut self, name: &str, adapter: Adapter) -> LayerResult<()> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        self.check_factors(adapter.a().dims(), adapter.b().dims())?;
        if adapter.is_dora() && !self.supports_dora() {
            return Err(LayerError::dora_unsupported());
        }
        if adapter.is_adalora() && !self.supports_adalora() {
            return Err(LayerError::adalora_unsupported());
        }
        self.set_routing(None);
        self.adapter_set_mut().insert(name, adapter);
        Ok(())
    }
}

impl dyn LoraLayer {
    /// The layer as its concrete kind, e.g. `layer.downcast_ref::<LoraLinear>()`.
    pub fn downcast_ref<T: LoraLayer>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
}

/// Installs `adapter` as [`DEFAULT_ADAPTER`] (`None`: removes it) and makes it active, as
/// PEFT's `load_adapter` into a fresh model does. The caller checked shapes and merge state.
pub(crate) fn install_default(layer: &mut dyn LoraLayer, adapter: Option<Adapter>) {
    layer.set_routing(None);
    let set = layer.adapter_set_mut();
    set.set_active(Some(DEFAULT_ADAPTER));
    match adapter {
        Some(ad) => set.insert(DEFAULT_ADAPTER, ad),
        None => {
            set.remove(DEFAULT_ADAPTER);
        }
    }
}
