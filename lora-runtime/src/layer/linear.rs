//! [`LoraLinear`]: a frozen linear layer plus named trainable low-rank adapters.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_nn::{Linear, Module, VarMap};
//! use lora_runtime::{LoraLinear, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let base = Linear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None);
//! let x = Tensor::randn(0f32, 1., (4, 16), &dev)?;
//! let y_base = base.forward(&x)?;
//!
//! // One layer is a model of its own: every model verb works on it.
//! let mut layer = LoraLinear::from(base);
//! layer.init_adapter(&VarMap::new())?;
//! // B starts at zero: a fresh adapter does not change the output.
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, y_base.to_vec2::<f32>()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::Linear;

use crate::adapter::{Adapter, AdapterSet};
use crate::config::LayerConfig;
use crate::decompose::decompose;
use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::kernels;
use crate::layer::quantized::QuantizedWeight;
use crate::layer::weight::{BaseWeight, Frozen, LinearWeight, MERGE};
use crate::layer::{LoraLayer, MergedWeight};
use crate::rng::DropoutRng;
use crate::routing::{Routing, RoutingTarget};

/// A linear layer with a frozen base weight and named LoRA adapters.
///
/// The forward pass is `x W^T + b + s * ((dropout(x) A^T) B^T)` with the active adapter; `B A` is
/// never formed. A DoRA adapter (one with a magnitude `m`) runs PEFT's DoRA forward instead:
/// `m / ||W + s B A||` (per output feature, the norm detached) times `x W^T + s (x A^T) B^T`,
/// plus the bias; that needs `B A` once per forward, for the norm, as in PEFT. An AdaLoRA
/// adapter runs PEFT's `SVDLinear` forward, `x W^T + b + ((dropout(x) (A * E)^T) B^T) * s` with
/// `s = alpha / (ranknum + 1e-5)` (see [`Adapter::effective_a`]). Built from a
/// [`candle_nn::Linear`] with `.into()`; without an adapter its output is bit-identical to the
/// base layer's.
///
/// The base weight and bias are detached plain tensors: no gradient flows into them. (For a
/// full fine-tuning baseline, [`LoraLinear::new_unfrozen`] keeps them attached.) The base may
/// also be a GGUF-quantized matrix ([`LoraLinear::from_quantized`], QLoRA): its forward is the
/// quantized matmul, the LoRA factors stay f32, and everything that needs the dense weight
/// (merging, DoRA, PiSSA / OLoRA) is refused with [`LayerError::Quantized`].
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// The weight as stored: `[out, in]`, or `[in, out]` when `fan_in_fan_out`; merged while
    /// merged. The only copy: the `[out, in]` view for the matmul is made per forward.
    weight: BaseWeight<LinearWeight>,
    bias: Option<Tensor>,
    /// `(out, in)`.
    shape: (usize, usize),
    fan_in_fan_out: bool,
    adapters: AdapterSet,
    /// Per-row adapters of a mixed-adapter batch (see [`crate::batched`]).
    routing: Option<Routing>,
    /// Training mode: dropout on the LoRA branch, merged layers refused.
    training: bool,
    /// Where training-mode dropout draws its masks (`None`: candle's unseeded generator).
    dropout_rng: Option<DropoutRng>,
}

impl From<Linear> for LoraLinear {
    /// Freezes a candle linear layer (whose weight is always a matrix `[out, in]`).
    fn from(linear: Linear) -> Self {
        Self::build(
            linear.weight().detach(),
            linear.bias().map(Tensor::detach),
            false,
        )
    }
}

impl LoraLinear {
    /// A layer without adapter from a weight `[out, in]` and an optional bias `[out]`.
    /// Both are detached from any gradient graph.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::build(weight.detach(), bias.map(|b| b.detach()), false)
    }

    /// A layer whose weight is stored `[in, out]`, as GPT-2's `Conv1D` does
    /// (PEFT's `fan_in_fan_out = true`): the forward is `x W + b`.
    ///
    /// # Errors
    /// When the weight is not a matrix.
    pub fn from_conv1d(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        weight.dims2()?;
        Ok(Self::build(weight.detach(), bias.map(|b| b.detach()), true))
    }

    /// A layer over a quantized weight `[out, in]` (QLoRA) and an optional bias `[out]`
    /// (detached). Its adapters are f32; it trains (the input's gradient goes through the weight
    /// dequantized per backward, transiently) but never merges: write a merged file with
    /// `lora merge` instead.
    pub fn from_quantized(weight: QuantizedWeight, bias: Option<Tensor>) -> Self {
        let shape = weight.dims();
        Self::assemble(
            BaseWeight::new(LinearWeight::Quantized(weight)),
            shape,
            bias.map(|b| b.detach()),
            false,
        )
    }

    /// Like `From<Linear>` but keeps the base weight and bias attached to their variables, so a
    /// full fine-tuning baseline can train them. LoRA training should use `.into()` instead.
    pub fn new_unfrozen(linear: Linear) -> Self {
        Self::build(linear.weight().clone(), linear.bias().cloned(), false)
    }

    fn build(weight: Tensor, bias: Option<Tensor>, fan_in_fan_out: bool) -> Self {
        // A matrix by construction (candle's `Linear`, `dims2` above); a tensor of another rank
        // is read as `[rows, last dim]`, which every operation then rejects as a shape error.
        let (rows, cols) = match *weight.dims() {
            [r, c] => (r, c),
            _ => {
                let cols = weight.dims().last().copied().unwrap_or(1).max(1);
                (weight.elem_count() / cols, cols)
            }
        };
        let shape = if fan_in_fan_out {
            (cols, rows)
        } else {
            (rows, cols)
        };
        Self::assemble(
            BaseWeight::new(LinearWeight::Dense(weight)),
            shape,
            bias,
            fan_in_fan_out,
        )
    }

    fn assemble(
        weight: BaseWeight<LinearWeight>,
        shape: (usize, usize),
        bias: Option<Tensor>,
        fan_in_fan_out: bool,
    ) -> Self {
        Self {
            shape,
            weight,
            bias,
            fan_in_fan_out,
            adapters: AdapterSet::default(),
            routing: None,
            training: false,
            dropout_rng: None,
        }
    }

    /// The weight as stored (`[out, in]`, or `[in, out]` with `fan_in_fan_out`); merged when
    /// merged.
    ///
    /// # Errors
    /// [`LayerError::Quantized`] for a quantized base (see
    /// [`quantized_weight`](Self::quantized_weight)).
    pub fn weight(&self) -> LayerResult<&Tensor> {
        self.weight.current().dense(NOT_DENSE)
    }
    /// The quantized base weight, for a layer built with
    /// [`from_quantized`](Self::from_quantized).
    pub fn quantized_weight(&self) -> Option<&QuantizedWeight> {
        match self.weight.current() {
            LinearWeight::Quantized(q) => Some(q),
            LinearWeight::Dense(_) => None,
        }
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// Input features (also [`LoraLayer::in_features`], here without importing the trait).
    pub fn in_features(&self) -> usize {
        self.shape.1
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.shape.0
    }
    /// The active adapter, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapters.active()
    }
    /// The adapter called `name`, active or not.
    pub fn adapter_named(&self, name: &str) -> Option<&Adapter> {
        self.adapters.get(name)
    }
    /// Whether an adapter is folded into the weight. (Inherent, with the meaning of both
    /// [`LoraLayer::is_merged`] and `LoraModelExt::is_merged`, so calls on a `LoraLinear` are
    /// never ambiguous.)
    pub fn is_merged(&self) -> bool {
        self.weight.is_merged()
    }
    /// Whether the layer is in training mode (dropout on the LoRA branch).
    pub fn is_training(&self) -> bool {
        self.training
    }
    /// Switches training mode, in which [`Module::forward`] applies the adapter's dropout and a
    /// merged layer is refused. Layers start in inference mode.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    /// Records the fingerprint of the weight as its file stores it (see
    /// [`BaseFingerprint::of_stored`]): adapters saved on this layer record it instead of a
    /// hash of the weight in memory, and adapters loaded onto it are checked against it. For
    /// loaders whose files are not the weights in memory (GGUF, quantized).
    pub fn set_stored_fingerprint(&mut self, fingerprint: BaseFingerprint) {
        self.weight.set_stored_fingerprint(fingerprint);
    }
    /// The weight without the adapter: [`weight`](Self::weight), or while merged the weight
    /// from before the merge. This is what adapter files fingerprint.
    ///
    /// # Errors
    /// [`LayerError::Quantized`] for a quantized base.
    pub fn base_weight(&self) -> LayerResult<&Tensor> {
        self.weight.original().dense(NOT_DENSE)
    }

    /// The weight `W [out, in]` when this layer's output is exactly `x W^T`: a dense weight
    /// stored `[out, in]`, no bias, no LoRA term (no active adapter, or merged into `W`) and no
    /// mixed-adapter routing. Lets a caller fuse the product with what follows it, as
    /// [`ops::linear_cross_entropy_sum`](crate::ops::linear_cross_entropy_sum) fuses an LM head
    /// with its loss.
    pub fn plain_weight(&self) -> Option<&Tensor> {
        let lora_term = self.adapter().is_some() && !self.is_merged();
        if lora_term || self.bias.is_some() || self.fan_in_fan_out || self.routing.is_some() {
            return None;
        }
        self.weight().ok()
    }

    /// The base layer as candle's `Linear` over the weight as `[out, in]` (a transposed view for
    /// `fan_in_fan_out`, no copy).
    ///
    /// # Errors
    /// For a quantized base.
    fn base(&self) -> candle_core::Result<Linear> {
        let weight = self
            .weight
            .current()
            .dense(NOT_DENSE)
            .map_err(candle_core::Error::wrap)?;
        let out_in = if self.fan_in_fan_out {
            weight.t()?
        } else {
            weight.clone()
        };
        Ok(Linear::new(out_in, self.bias.clone()))
    }

    /// `s * B A` of the active adapter in f32, in the layout of the stored weight (transposed
    /// for `fan_in_fan_out`). Detached: no gradient flows through it. (For a DoRA adapter the
    /// merge also rescales `W + s B A` by its magnitude: see [`LoraLayer::prepare_merge`].)
    ///
    /// # Errors
    /// [`LayerError::NoAdapter`] when the layer has no active adapter.
    pub fn delta_weight(&self) -> LayerResult<Tensor> {
        let delta = self.adapter().ok_or(LayerError::NoAdapter)?.delta()?;
        Ok(if self.fan_in_fan_out {
            delta.t()?
        } else {
            delta
        })
    }

    /// `s B A` as two thin factors `(L, R)` of the stored layout, flattened for the CPU kernels
    /// (`a` is the adapter's `A`, or AdaLoRA's `A * E`): `W [out, in] + (s B) A`, or for a weight
    /// stored `[in, out]` (`fan_in_fan_out`) `+ A^T (s B)^T`.
    fn stored_low_rank(
        &self,
        a: &Tensor,
        ad: &Adapter,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let sb = ad.b().as_tensor().detach().affine(ad.scaling(), 0.0)?;
        let (l, r) = if self.fan_in_fan_out {
            (a.t()?, sb.t()?)
        } else {
            (sb, a.detach())
        };
        Ok((
            l.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            r.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        ))
    }

    /// The CPU fast path of the merge for an f32 layer: `W + s B A` in one pass over `W` with
    /// the finite check folded in (see `kernels::add_low_rank`).
    fn merge_on_cpu(&self, ad: &Adapter) -> LayerResult<CpuMerge> {
        let a = ad.effective_a()?;
        let (a, b) = (&a, ad.b().as_tensor());
        let on_cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
        let weight = self.weight.current().dense(MERGE)?;
        if !(on_cpu_f32(weight) && on_cpu_f32(a) && on_cpu_f32(b)) {
            return Ok(CpuMerge::NotApplicable);
        }
        let (rows, cols) = weight.dims2()?;
        let (guard, layout) = weight.storage_and_layout();
        let (candle_core::Storage::Cpu(storage), Some((start, end))) =
            (&*guard, layout.contiguous_offsets())
        else {
            return Ok(CpuMerge::NotApplicable);
        };
        let w = &storage.as_slice::<f32>()?[start..end];
        let (l, rt) = self.stored_low_rank(a, ad)?;
        let mut out = vec![0f32; w.len()];
        let finite = kernels::add_low_rank(w, &l, &rt, ad.rank(), cols, &mut out)?;
        drop(guard);
        if !finite {
            return Ok(CpuMerge::NonFinite);
        }
        let merged = Tensor::from_vec(out, (rows, cols), weight.device())?;
        Ok(CpuMerge::Merged(merged))
    }

    /// The CPU fast path of [`LoraLayer::dora_weight_norm`] for an f32 layer (`None`: it does
    /// not apply).
    fn dora_weight_norm_on_cpu(&self, ad: &Adapter) -> LayerResult<Option<Tensor>> {
        let w = self.weight.original().dense(DORA)?;
        let (a, b) = (ad.a().as_tensor(), ad.b().as_tensor());
        let on_cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
        if !(on_cpu_f32(w) && on_cpu_f32(a) && on_cpu_f32(b)) {
            return Ok(None);
        }
        let (_, cols) = w.dims2()?;
        // Norms of the rows of `W + sB A`; stored [in, out]: of the columns.
        let (l, rt) = self.stored_low_rank(a, ad)?;
        let (guard, layout) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(storage), Some((start, end))) =
            (&*guard, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let values = &storage.as_slice::<f32>()?[start..end];
        let norms = kernels::low_rank_norms(values, &l, &rt, ad.rank(), cols, self.fan_in_fan_out)?;
        drop(guard);
        let n = norms.len();
        Ok(Some(Tensor::from_vec(norms, n, w.device())?))
    }

    /// A forward in which row `i` of `x [b, .., in]` uses the adapter `rows[i]` (`None`: the
    /// base alone): all rows in one pass, with the stacked factors gathered per row and two
    /// batched matmuls. Equal to running each row alone with its adapter active.
    ///
    /// # Errors
    /// [`LayerError::Merged`] when merged, [`LayerError::UnknownAdapter`] for an adapter name
    /// this layer does not have; a candle error for a row count that does not match `x`.
    pub fn forward_with_adapters(&self, x: &Tensor, rows: &[Option<&str>]) -> LayerResult<Tensor> {
        let routing = self.prepare_routing(rows)?;
        Ok(self.routed_forward(&routing, x)?)
    }

    /// The base plus the routed LoRA terms: on the CPU in f32 one output buffer (the stacked
    /// `B` product and the base matmul accumulate into it, see `kernels::fused_forward`).
    fn routed_forward(&self, routing: &Routing, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.quantized_weight().is_some() {
            return self.base_forward(x)? + routing.term(x)?;
        }
        let base = self.base()?;
        let (weight, bias) = (base.weight(), base.bias());
        if let (true, Some((factors, slots))) = (
            kernels::fused_applies(x, routing.b_all(), routing.b_all(), weight, bias),
            routing.cpu_factors(),
        ) {
            let rows = x.dims().first().copied().unwrap_or(0);
            if rows != slots.len() {
                candle_core::bail!(
                    "mixed-adapter batch: the input has {rows} rows but {} row adapters were set",
                    slots.len()
                );
            }
            let (inp, out_dims) = self.flat_dims(x)?;
            let x2 = x.reshape((x.elem_count() / inp.max(1), inp))?;
            return kernels::routed_forward(&x2, weight, bias, factors, slots)?.reshape(out_dims);
        }
        self.dense_forward(&base, x)? + routing.term(x)?
    }

    /// The input width and the output shape for an input `[..., in]`.
    fn flat_dims(&self, x: &Tensor) -> candle_core::Result<(usize, Vec<usize>)> {
        let inp = x.dim(D::Minus1)?;
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.shape.0;
        }
        Ok((inp, out_dims))
    }

    /// `s * (x A^T)` for `x [n, in]`: the thin `[n, r]` product, scaled there rather than on the
    /// `[n, out]` output.
    fn lora_hidden(ad: &Adapter, x2: &Tensor) -> candle_core::Result<Tensor> {
        x2.to_dtype(ad.a().dtype())?
            .matmul(&ad.effective_a()?.t()?)?
            .affine(ad.scaling(), 0.0)
    }

    /// The LoRA branch `s * ((x A^T) B^T)` for an input `[..., in]`.
    fn lora_term(&self, ad: &Adapter, x: &Tensor) -> candle_core::Result<Tensor> {
        let (inp, out_dims) = self.flat_dims(x)?;
        let n = x.elem_count() / inp.max(1);
        let h = Self::lora_hidden(ad, &x.reshape((n, inp))?)?;
        let d = h.matmul(&ad.b().as_tensor().t()?)?;
        d.reshape(out_dims)?.to_dtype(x.dtype())
    }

    /// `x W^T + b + s * ((dropout(x) A^T) B^T)`, with dropout only when `train`, whatever the
    /// layer's mode. (candle's blanket `ModuleT` impl ignores its flag; this inherent method,
    /// which method calls on a `LoraLinear` resolve to, does not.)
    ///
    /// A merged layer runs the base matmul alone; training a merged layer is refused, since no
    /// gradient would reach `A` and `B`.
    ///
    /// # Errors
    /// Shape errors from candle; training a merged layer.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let (Some(routing), false) = (&self.routing, self.is_merged()) {
            if train {
                return Err(candle_core::Error::msg(
                    "LoraLinear: mixed-adapter batches are for inference; call `set_batch_adapters(None)` before training",
                ));
            }
            return self.routed_forward(routing, x);
        }
        let Some(ad) = self.adapter() else {
            return self.base_forward(x);
        };
        if self.is_merged() {
            if train {
                return Err(candle_core::Error::msg(
                    "LoraLinear: cannot train a merged layer, call `unmerge()` first",
                ));
            }
            return self.base_forward(x);
        }
        let dropout = train && ad.dropout() > 0.0;
        let dropped;
        let x_lora = if dropout {
            dropped = match &self.dropout_rng {
                Some(rng) => rng.dropout(x, ad.dropout())?,
                None => candle_nn::ops::dropout(x, ad.dropout())?,
            };
            &dropped
        } else {
            x
        };
        if self.quantized_weight().is_some() {
            return self.base_forward(x)? + self.lora_term(ad, x_lora)?;
        }
        let base = self.base()?;
        if let Some(magnitude) = ad.magnitude() {
            return self.dora_forward(&base, ad, magnitude, x, dropout.then_some(x_lora));
        }
        let (weight, bias) = (base.weight(), base.bias());
        if kernels::fused_applies(x, ad.a().as_tensor(), ad.b().as_tensor(), weight, bias) {
            // One output buffer, no `[n, out]` temporary, no extra add pass (see `kernels`).
            let (inp, out_dims) = self.flat_dims(x)?;
            let n = x.elem_count() / inp.max(1);
            let h = Self::lora_hidden(ad, &x_lora.reshape((n, inp))?)?;
            let y = kernels::fused_forward(
                &x.reshape((n, inp))?,
                &h,
                ad.b().as_tensor(),
                weight,
                bias,
            )?;
            return y.reshape(out_dims);
        }
        let y = self.dense_forward(&base, x)?;
        y + self.lora_term(ad, x_lora)?
    }

    /// DoRA's forward, as PEFT's `DoraLinearLayer.forward`: with `g = m / ||W + s B A||` per
    /// output feature (the norm detached),
    /// `y = g * (x W^T + s (x A^T) B^T) + b` without dropout, and with dropout (`dropped` is the
    /// dropped input `x_d`) `y = x W^T + b + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T`. The
    /// gradient reaches `A`, `B` and `m`, and the input; never `W`.
    fn dora_forward(
        &self,
        base: &Linear,
        ad: &Adapter,
        magnitude: &candle_core::Var,
        x: &Tensor,
        dropped: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let norm = self.dora_weight_norm(ad).map_err(|e| match e {
            LayerError::Candle(e) => e,
            other => candle_core::Error::msg(other.to_string()),
        })?;
        let g = (magnitude.as_tensor().to_dtype(norm.dtype())? / norm)?.to_dtype(x.dtype())?;
        let unbiased = Linear::new(base.weight().clone(), None);
        if let Some(x_d) = dropped {
            let y = self.dense_forward(base, x)?;
            let dropped_base = self.dense_forward(&unbiased, x_d)?;
            let lora = self.lora_term(ad, x_d)?;
            let extra =
                (dropped_base.broadcast_mul(&g.affine(1.0, -1.0)?)? + lora.broadcast_mul(&g)?)?;
            return y + extra;
        }
        let (a, b) = (ad.a().as_tensor(), ad.b().as_tensor());
        let y = if kernels::fused_applies(x, a, b, base.weight(), None) {
            let (inp, out_dims) = self.flat_dims(x)?;
            let n = x.elem_count() / inp.max(1);
            let x2 = x.reshape((n, inp))?;
            let h = Self::lora_hidden(ad, &x2)?;
            let y = kernels::fused_forward(&x2, &h, b, base.weight(), None)?;
            // The scale and the bias in one pass over the output.
            if let Some(y) = kernels::scale_columns(&y, &g, base.bias())? {
                return y.reshape(out_dims);
            }
            y.reshape(out_dims)?
        } else {
            (self.dense_forward(&unbiased, x)? + self.lora_term(ad, x)?)?
        };
        let y = y.broadcast_mul(&g)?;
        match base.bias() {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// DoRA's merge, as PEFT's: `(m / ||W + s B A||) * (W + s B A)` row by row of `[out, in]`
    /// (column by column of a stored `[in, out]`), in f32, cast to the weight's dtype.
    fn prepare_dora_merge(
        &self,
        ad: &Adapter,
        magnitude: &candle_core::Var,
    ) -> LayerResult<MergedWeight> {
        let plain = match self.merge_on_cpu(ad)? {
            CpuMerge::Merged(w) => w,
            CpuMerge::NonFinite => return Err(LayerError::NonFinite),
            CpuMerge::NotApplicable => {
                (self
                    .weight
                    .current()
                    .dense(MERGE)?
                    .detach()
                    .to_dtype(DType::F32)?
                    + self.delta_weight()?)?
            }
        };
        // The norm of each output feature: a row of `[out, in]`, a column of `[in, out]`.
        let (reduce, expand) = if self.fan_in_fan_out { (0, 0) } else { (1, 1) };
        let norm = plain.sqr()?.sum(reduce)?.sqrt()?;
        let g = (magnitude.as_tensor().detach().to_dtype(DType::F32)? / norm)?;
        let merged = plain
            .broadcast_mul(&g.unsqueeze(expand)?)?
            .to_dtype(self.weight.current().dtype())?;
        if !kernels::all_finite(&merged)? {
            return Err(LayerError::NonFinite);
        }
        Ok(MergedWeight(merged))
    }

    /// The base layer's output `x W^T + b`, dense or quantized.
    fn base_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some(q) = self.quantized_weight() else {
            return self.dense_forward(&self.base()?, x);
        };
        let y = q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// The dense base layer's output: in a graph that trains (the input tracks a gradient), a
    /// frozen weight goes through [`kernels::frozen_linear`] (no weight gradient in the backward
    /// pass); otherwise, and for an unfrozen weight (full fine-tuning), candle's `Linear`.
    fn dense_forward(&self, base: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
        let frozen = !(base.weight().track_op() || base.bias().is_some_and(Tensor::track_op));
        if frozen && x.track_op() {
            kernels::frozen_linear(x, base.weight(), base.bias())
        } else {
            base.forward(x)
        }
    }
}

/// What [`LayerError::Quantized`] says when the dense weight is asked of a quantized layer.
const NOT_DENSE: &str = "it has no dense weight (see `LoraLinear::quantized_weight`)";
/// ... when DoRA needs it.
const DORA: &str = "DoRA needs a dense base weight: load the model with a float dtype";
/// ... when PiSSA / OLoRA would decompose it.
const DECOMPOSE: &str =
    "PiSSA and OLoRA decompose the base weight, which needs it dense: load the model with a \
     float dtype";

/// The outcome of the CPU fast path of a merge.
enum CpuMerge {
    /// Not an f32 CPU layer: take the general path.
    NotApplicable,
    /// The merged weight.
    Merged(Tensor),
    /// The merged weight would hold NaN or inf.
    NonFinite,
}

impl LoraLayer for LoraLinear {
    fn in_features(&self) -> usize {
        self.shape.1
    }
    fn out_features(&self) -> usize {
        self.shape.0
    }
    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }
    /// The weight's dtype, except that f16 and bf16 layers keep f32 factors (as PEFT's
    /// `autocast_adapter_dtype` does), so small updates are not lost to rounding; the LoRA
    /// branch then runs in f32 and its result is cast back.
    fn adapter_dtype(&self) -> DType {
        match self.weight.current().dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        }
    }
    fn device(&self) -> &Device {
        self.weight.current().device()
    }
    fn base_parameters(&self) -> usize {
        self.weight.current().elem_count() + self.bias.as_ref().map_or(0, Tensor::elem_count)
    }
    fn base_fingerprint(&self) -> LayerResult<BaseFingerprint> {
        self.weight.fingerprint()
    }
    fn adapter_set(&self) -> &AdapterSet {
        &self.adapters
    }
    fn adapter_set_mut(&mut self) -> &mut AdapterSet {
        &mut self.adapters
    }
    fn is_merged(&self) -> bool {
        LoraLinear::is_merged(self)
    }

    /// `W + s B A`, computed in f32 and cast to the weight's dtype. The CPU path for f32 layers
    /// reads `W` once and writes the result once, the finite check folded in.
    fn prepare_merge(&self) -> LayerResult<MergedWeight> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        let ad = self.adapter().ok_or(LayerError::NoAdapter)?;
        if let Some(magnitude) = ad.magnitude() {
            return self.prepare_dora_merge(ad, magnitude);
        }
        match self.merge_on_cpu(ad)? {
            CpuMerge::Merged(w) => return Ok(MergedWeight(w)),
            CpuMerge::NonFinite => return Err(LayerError::NonFinite),
            CpuMerge::NotApplicable => {}
        }
        self.weight.plus(&self.delta_weight()?)
    }

    /// The weight from before the merge is kept (a reference to the same memory, no copy), so
    /// the unmerge restores it bit for bit; the price is that the merged and the original
    /// weight both live in memory while merged (`merge_and_unload` drops the original).
    fn fresh_decomposed(
        &self,
        config: &LayerConfig,
        seed: u64,
    ) -> LayerResult<(Adapter, MergedWeight)> {
        let Some(how) = config.init.decomposition() else {
            return Err(LayerError::InvalidConfig {
                field: "init".into(),
                reason: format!("{:?} is not a decomposition (PiSSA or OLoRA)", config.init),
            });
        };
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        if config.use_dora {
            return Err(LayerError::InvalidConfig {
                field: "use_dora".into(),
                reason: "DoRA with PiSSA or OLoRA initialisation is not supported".into(),
            });
        }
        if config.adalora.is_some() {
            return Err(LayerError::InvalidConfig {
                field: "init_lora_weights".into(),
                reason: "AdaLoRA with PiSSA or OLoRA initialisation is not supported".into(),
            });
        }
        config.check()?;
        let (out, inp) = self.shape;
        self.weight.current().dense(DECOMPOSE)?;
        let w: Vec<f32> = self
            .base()?
            .weight()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let d = decompose(&w, out, inp, config.rank, config.scaling(), how, seed)?;
        let (dev, dtype) = (self.device().clone(), self.adapter_dtype());
        let factor = |v: Vec<f32>, shape: (usize, usize)| -> LayerResult<Var> {
            Ok(Var::from_tensor(
                &Tensor::from_vec(v, shape, &dev)?.to_dtype(dtype)?,
            )?)
        };
        let adapter = Adapter::new(
            factor(d.a, (config.rank, inp))?,
            factor(d.b, (out, config.rank))?,
            config.alpha,
            config.use_rslora,
            config.dropout,
        )?
        .with_init(config.init);
        let residual = Tensor::from_vec(d.residual, (out, inp), &dev)?
            .to_dtype(self.weight.current().dtype())?;
        let residual = if self.fan_in_fan_out {
            residual.t()?.contiguous()?
        } else {
            residual
        };
        Ok((adapter, MergedWeight(residual)))
    }

    fn install_residual(&mut self, residual: MergedWeight) {
        self.routing = None;
        self.weight.replace(residual.0);
    }

    fn commit_merge(&mut self, merged: MergedWeight) {
        // A mixed-adapter routing would add its deltas on top of the merged weight.
        self.routing = None;
        self.weight.commit(merged);
    }

    fn revert_merge(&mut self) -> LayerResult<()> {
        self.weight.revert()
    }

    fn unload(&mut self) {
        // The merged weight becomes the base: its fingerprint is another.
        self.weight.unload();
        self.adapters.clear();
        self.routing = None;
    }

    fn set_routing(&mut self, routing: Option<Routing>) {
        self.routing = routing;
    }

    fn supports_dora(&self) -> bool {
        self.quantized_weight().is_none()
    }

    fn supports_adalora(&self) -> bool {
        true
    }

    /// `||W + s B A||` per output feature from the unmerged weight, detached; in f32 (f64 for
    /// an f64 layer). An f32 layer on the CPU takes `kernels::low_rank_norms`: one pass over `W`
    /// and no `[out, in]` temporary (in PEFT, and on the general path, `B A` and `W + s B A` are
    /// formed every forward).
    fn dora_weight_norm(&self, adapter: &Adapter) -> LayerResult<Tensor> {
        if let Some(norms) = self.dora_weight_norm_on_cpu(adapter)? {
            return Ok(norms);
        }
        let dtype = match self.weight.current().dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        let w = self
            .weight
            .original()
            .dense(DORA)?
            .detach()
            .to_dtype(dtype)?;
        let w = if self.fan_in_fan_out { w.t()? } else { w };
        let a = adapter.a().as_tensor().detach().to_dtype(dtype)?;
        let sb = adapter.b().as_tensor().detach().to_dtype(dtype)?;
        let delta = sb.affine(adapter.scaling(), 0.0)?.matmul(&a)?;
        Ok((w + delta)?.sqr()?.sum(1)?.sqrt()?)
    }

    fn prepare_routing(&self, rows: &[Option<&str>]) -> LayerResult<Routing> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        let target = RoutingTarget {
            inp: self.shape.1,
            out: self.shape.0,
            dtype: self.adapter_dtype(),
            device: self.weight.current().device(),
        };
        // Only the assignment changed: keep the stacks (see `Routing::with_rows`).
        if let Some(current) = &self.routing {
            if current.stacks(&self.adapters.names()) {
                return current.with_rows(&self.adapters, rows);
            }
        }
        Routing::new(&self.adapters, rows, target)
    }

    fn is_training(&self) -> bool {
        LoraLinear::is_training(self)
    }
    fn set_training(&mut self, training: bool) {
        LoraLinear::set_training(self, training);
    }
    fn set_dropout_rng(&mut self, rng: Option<DropoutRng>) {
        self.dropout_rng = rng;
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Module for LoraLinear {
    /// The forward pass in the layer's mode (see [`LoraLinear::forward_t`]).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(x, self.training)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::DEFAULT_ADAPTER;
    use crate::config::LayerConfig;
    use crate::rng::DropoutRng;
    use candle_core::{Device, Var};

    fn layer(fan_in_fan_out: bool) -> LoraLinear {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        if fan_in_fan_out {
            LoraLinear::from_conv1d(w.t().unwrap().contiguous().unwrap(), Some(b)).unwrap()
        } else {
            LoraLinear::new(w, Some(b))
        }
    }

    fn with_adapter(fan_in_fan_out: bool, config: LayerConfig) -> LoraLinear {
        let mut l = layer(fan_in_fan_out);
        let adapter = l.fresh_adapter(&config, 1).unwrap();
        l.insert_adapter(DEFAULT_ADAPTER, adapter).unwrap();
        l
    }

    #[test]
    fn merge_is_exactly_reversible_and_refuses_twice() {
        for fan_in_fan_out in [false, true] {
            let mut l = with_adapter(fan_in_fan_out, LayerConfig::new(2, 4.0));
            let b = Tensor::randn(0f32, 1.0, (6, 2), &Device::Cpu).unwrap();
            l.adapter().unwrap().b().set(&b).unwrap();
            let w0 = l.weight().unwrap().to_vec2::<f32>().unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
            let y0 = l.forward(&x).unwrap();
            let merged = l.prepare_merge().unwrap();
            l.commit_merge(merged);
            assert!(matches!(l.prepare_merge(), Err(LayerError::Merged)));
            let y1 = l.forward(&x).unwrap();
            let diff = (y0 - y1)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{diff}");
            l.revert_merge().unwrap();
            assert_eq!(l.weight().unwrap().to_vec2::<f32>().unwrap(), w0);
            assert!(matches!(l.revert_merge(), Err(LayerError::NotMerged)));
        }
    }

    #[test]
    fn non_finite_merge_leaves_layer_unchanged() {
        let l = with_adapter(false, LayerConfig::new(2, 4.0));
        let b = Tensor::full(f32::INFINITY, (6, 2), &Device::Cpu).unwrap();
        l.adapter().unwrap().b().set(&b).unwrap();
        let w0 = l.weight().unwrap().to_vec2::<f32>().unwrap();
        assert!(matches!(l.prepare_merge(), Err(LayerError::NonFinite)));
        assert!(!l.is_merged());
        assert_eq!(l.weight().unwrap().to_vec2::<f32>().unwrap(), w0);
    }

    #[test]
    fn fused_forward_and_gradients_match_the_unfused_graph() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            let l = with_adapter(fan_in_fan_out, LayerConfig::new(2, 3.0));
            let ad = l.adapter().unwrap().clone();
            ad.b()
                .set(&Tensor::randn(0f32, 0.5, (6, 2), &dev).unwrap())
                .unwrap();
            let base = l.base().unwrap();
            let (w, bias) = (base.weight().clone(), base.bias().unwrap().clone());
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap()).unwrap();
            let (a, b) = (ad.a().as_tensor(), ad.b().as_tensor());
            assert!(kernels::fused_applies(x.as_tensor(), a, b, &w, Some(&bias)));
            let fused = l.forward_t(x.as_tensor(), true).unwrap();
            let s = ad.scaling();
            let reference = (x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap()
                + x.broadcast_matmul(&a.t().unwrap())
                    .unwrap()
                    .affine(s, 0.0)
                    .unwrap()
                    .broadcast_matmul(&b.t().unwrap())
                    .unwrap())
            .unwrap();
            let close = |p: &Tensor, q: &Tensor| {
                let d = (p - q)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // f32 sums of a few products, in another order: relative to the magnitude.
                let scale = q
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(d <= 1e-5 * scale.max(1.0), "{d} (scale {scale})");
            };
            close(&fused, &reference);
            let gf = (fused.sqr().unwrap().sum_all().unwrap())
                .backward()
                .unwrap();
            let gr = (reference.sqr().unwrap().sum_all().unwrap())
                .backward()
                .unwrap();
            for t in [a, b, x.as_tensor()] {
                close(gf.get(t).unwrap(), gr.get(t).unwrap());
            }
        }
    }

    #[test]
    fn the_frozen_base_path_gives_the_composed_graph_gradients_without_a_weight_gradient() {
        // f64: the fused f32 kernel does not apply, so the base runs through `frozen_linear`.
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (6, 5), &dev).unwrap()).unwrap();
        let bias = Tensor::randn(0f64, 0.5, 6, &dev).unwrap();
        let mut l = LoraLinear::new(w.as_tensor().clone(), Some(bias.clone()));
        let adapter = l.fresh_adapter(&LayerConfig::new(2, 3.0), 1).unwrap();
        adapter
            .b()
            .set(&Tensor::randn(0f64, 0.5, (6, 2), &dev).unwrap())
            .unwrap();
        l.insert_adapter(DEFAULT_ADAPTER, adapter.clone()).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5), &dev).unwrap()).unwrap();
        let ours = l.forward_t(x.as_tensor(), true).unwrap();
        let (a, b) = (adapter.a().as_tensor(), adapter.b().as_tensor());
        // The composed graph, with the weight as a variable: candle computes its gradient too.
        let reference = (x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            + x.broadcast_matmul(&a.t().unwrap())
                .unwrap()
                .affine(adapter.scaling(), 0.0)
                .unwrap()
                .broadcast_matmul(&b.t().unwrap())
                .unwrap())
        .unwrap();
        let max_diff = |p: &Tensor, q: &Tensor| -> f64 {
            (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(max_diff(&ours, &reference) < 1e-12);
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [a, b, x.as_tensor()] {
            assert!(max_diff(g_ours.get(t).unwrap(), g_ref.get(t).unwrap()) < 1e-10);
        }
        assert!(g_ref.get(w.as_tensor()).is_some());
        assert!(
            g_ours.get(w.as_tensor()).is_none(),
            "no gradient for the frozen weight"
        );
    }

    /// A layer `[6, 5]` (stored transposed with `fan_in_fan_out`) of `dtype` with a DoRA
    /// adapter: non-zero `B` and magnitudes moved away from their initial norms.
    fn dora_layer(fan_in_fan_out: bool, dtype: DType, dropout: f32) -> LoraLinear {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 6, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let mut l = if fan_in_fan_out {
            let w = w
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            LoraLinear::from_conv1d(w, Some(bias)).unwrap()
        } else {
            LoraLinear::new(w.to_dtype(dtype).unwrap(), Some(bias))
        };
        let config = LayerConfig::new(2, 3.0)
            .with_dora(true)
            .with_dropout(dropout);
        let ad = l.fresh_adapter(&config, 1).unwrap();
        // f16/bf16 layers keep f32 factors.
        let ad_dtype = l.adapter_dtype();
        let b = Tensor::randn(0f32, 0.5, (6, 2), &dev).unwrap();
        ad.b().set(&b.to_dtype(ad_dtype).unwrap()).unwrap();
        let m = ad.magnitude().unwrap();
        let moved = Tensor::rand(0.7f32, 1.3, 6, &dev)
            .unwrap()
            .to_dtype(ad_dtype)
            .unwrap();
        m.set(&(m.as_tensor() * moved).unwrap()).unwrap();
        l.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
        l
    }

    fn max_abs_diff(p: &Tensor, q: &Tensor) -> f64 {
        (p.to_dtype(DType::F64).unwrap() - q.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The weight as `[out, in]`.
    fn out_in(l: &LoraLinear, w: &Tensor) -> Tensor {
        if l.fan_in_fan_out {
            w.t().unwrap()
        } else {
            w.clone()
        }
    }

    /// DoRA's forward written out in PEFT's form,
    /// `x W^T + b + (g - 1) * (x_d W^T) + g * s (x_d A^T) B^T` with `g = m / norm`.
    fn dora_reference(l: &LoraLinear, x: &Tensor, x_d: &Tensor, norm: &Tensor) -> Tensor {
        let ad = l.adapter().unwrap();
        let w = out_in(l, l.weight().unwrap());
        let g = (ad.magnitude().unwrap().as_tensor() / norm).unwrap();
        let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let y = base.broadcast_add(l.bias().unwrap()).unwrap();
        let dropped_base = x_d.broadcast_matmul(&w.t().unwrap()).unwrap();
        let lora = x_d
            .broadcast_matmul(&ad.a().as_tensor().t().unwrap())
            .unwrap()
            .affine(ad.scaling(), 0.0)
            .unwrap()
            .broadcast_matmul(&ad.b().as_tensor().t().unwrap())
            .unwrap();
        let extra = (dropped_base
            .broadcast_mul(&g.affine(1.0, -1.0).unwrap())
            .unwrap()
            + lora.broadcast_mul(&g).unwrap())
        .unwrap();
        (y + extra).unwrap()
    }

    /// `||W + s B A||` per output feature, in f64 from scratch.
    fn reference_norm(l: &LoraLinear) -> Tensor {
        let ad = l.adapter().unwrap();
        let w = out_in(l, l.base_weight().unwrap())
            .to_dtype(DType::F64)
            .unwrap();
        let ba = ad
            .b()
            .as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&ad.a().as_tensor().to_dtype(DType::F64).unwrap())
            .unwrap()
            .affine(ad.scaling(), 0.0)
            .unwrap();
        (w + ba)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
    }

    #[test]
    fn dora_fresh_adapter_starts_at_the_weight_norms_and_changes_nothing() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            let mut l = layer(fan_in_fan_out);
            let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
            let y0 = l.forward(&x).unwrap();
            let config = LayerConfig::new(2, 3.0).with_dora(true);
            let ad = l.fresh_adapter(&config, 1).unwrap();
            assert!(ad.is_dora());
            assert_eq!(ad.num_parameters(), 2 * (5 + 6) + 6);
            let norms = out_in(&l, l.weight().unwrap())
                .sqr()
                .unwrap()
                .sum(1)
                .unwrap()
                .sqrt()
                .unwrap();
            assert!(max_abs_diff(ad.magnitude().unwrap().as_tensor(), &norms) < 1e-6);
            l.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
            assert!(max_abs_diff(&l.forward(&x).unwrap(), &y0) < 1e-5);
        }
    }

    #[test]
    fn dora_forward_follows_peft_with_and_without_dropout() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            // f32 takes the fused kernel, f64 the general path.
            for dtype in [DType::F32, DType::F64] {
                let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
                let mut l = dora_layer(fan_in_fan_out, dtype, 0.5);
                let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let norm = reference_norm(&l).to_dtype(dtype).unwrap();
                let expected = dora_reference(&l, &x, &x, &norm);
                let d = max_abs_diff(&l.forward(&x).unwrap(), &expected);
                assert!(d < tol, "{fan_in_fan_out} {dtype:?}: {d}");
                // Training mode: the dropped input goes through the LoRA branch and the base
                // term that DoRA rescales, as in PEFT; the same seed gives the same mask.
                l.set_training(true);
                LoraLayer::set_dropout_rng(&mut l, Some(DropoutRng::new(9)));
                let y = l.forward(&x).unwrap();
                let x_d = DropoutRng::new(9).dropout(&x, 0.5).unwrap();
                let expected = dora_reference(&l, &x, &x_d, &norm);
                assert!(
                    max_abs_diff(&y, &expected) < tol,
                    "{fan_in_fan_out} {dtype:?}"
                );
                let no_dropout = dora_reference(&l, &x, &x, &norm);
                assert!(
                    max_abs_diff(&y, &no_dropout) > 1e-3,
                    "dropout had no effect"
                );
            }
        }
    }

    /// The gradients of `A`, `B` and `m` against central finite differences of the forward
    /// with the weight norm held at its value (DoRA detaches it), in f64; the frozen weight gets
    /// none.
    #[test]
    fn dora_gradients_match_finite_differences_with_the_norm_detached() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            let l = dora_layer(fan_in_fan_out, DType::F64, 0.0);
            let ad = l.adapter().unwrap().clone();
            // The weight as a variable: the layer must not hand it a gradient.
            let w = Var::from_tensor(l.weight().unwrap()).unwrap();
            let bias = l.bias().cloned();
            let mut l = if fan_in_fan_out {
                LoraLinear::from_conv1d(w.as_tensor().clone(), bias).unwrap()
            } else {
                LoraLinear::new(w.as_tensor().clone(), bias)
            };
            l.insert_adapter(DEFAULT_ADAPTER, ad.clone()).unwrap();
            let x = Tensor::randn(0f64, 1.0, (4, 5), &dev).unwrap();
            let c = Tensor::randn(0f64, 1.0, (4, 6), &dev).unwrap();
            let loss = |y: &Tensor| (y * &c).unwrap().sum_all().unwrap();
            let grads = loss(&l.forward(&x).unwrap()).backward().unwrap();
            assert!(grads.get(w.as_tensor()).is_none(), "no gradient for W");
            let norm = reference_norm(&l);
            for (factor, var) in ad.vars() {
                let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
                let analytic = analytic.to_vec1::<f64>().unwrap();
                let original = var.as_tensor().copy().unwrap();
                let flat = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let h = 1e-6;
                for (i, g) in analytic.iter().enumerate() {
                    let at = |delta: f64| {
                        let mut v = flat.clone();
                        v[i] += delta;
                        var.set(&Tensor::from_vec(v, original.shape(), &dev).unwrap())
                            .unwrap();
                        let y = dora_reference(&l, &x, &x, &norm);
                        loss(&y).to_scalar::<f64>().unwrap()
                    };
                    let numeric = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (numeric - g).abs() <= 1e-6 * (1.0 + g.abs()),
                        "{factor} [{i}]: analytic {g}, numeric {numeric}"
                    );
                }
                var.set(&original).unwrap();
            }
        }
    }

    #[test]
    fn dora_merge_rescales_each_output_feature_and_unmerges_exactly() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            for dtype in [DType::F32, DType::F64] {
                let mut l = dora_layer(fan_in_fan_out, dtype, 0.0);
                let w0 = l.weight().unwrap().copy().unwrap();
                let x = Tensor::randn(0f32, 1.0, (3, 5), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y0 = l.forward(&x).unwrap();
                // (m / ||W + s B A||) * (W + s B A), row by row of [out, in].
                let ad = l.adapter().unwrap();
                let plain = (out_in(&l, &w0).to_dtype(DType::F64).unwrap()
                    + ad.delta().unwrap().to_dtype(DType::F64).unwrap())
                .unwrap();
                let g = (ad
                    .magnitude()
                    .unwrap()
                    .as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    / reference_norm(&l))
                .unwrap();
                let expected = plain.broadcast_mul(&g.unsqueeze(1).unwrap()).unwrap();
                let merged = l.prepare_merge().unwrap();
                l.commit_merge(merged);
                assert!(max_abs_diff(&out_in(&l, l.weight().unwrap()), &expected) < 1e-5);
                assert!(max_abs_diff(&l.forward(&x).unwrap(), &y0) < 1e-4);
                l.revert_merge().unwrap();
                // Bit for bit: the conversion to f64 is exact.
                let (a, b) = (
                    l.weight().unwrap().to_dtype(DType::F64).unwrap(),
                    w0.to_dtype(DType::F64).unwrap(),
                );
                assert_eq!(max_abs_diff(&a, &b), 0.0);
            }
        }
    }

    /// A bf16 layer (f32 factors and magnitude): the forward runs the LoRA branch and the norm
    /// in f32 and stays within bf16 rounding of the same layer in f32; the merge rounds the f32
    /// result once, and the unmerge restores the bf16 weight bit for bit.
    #[test]
    fn dora_on_a_bf16_layer_merges_through_f32_and_unmerges_exactly() {
        let dev = Device::Cpu;
        for fan_in_fan_out in [false, true] {
            let mut half = dora_layer(fan_in_fan_out, DType::BF16, 0.0);
            let ad = half.adapter().unwrap().clone();
            assert_eq!(ad.magnitude().unwrap().dtype(), DType::F32);
            let to_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let mut full = if fan_in_fan_out {
                LoraLinear::from_conv1d(to_f32(half.weight().unwrap()), half.bias().map(to_f32))
                    .unwrap()
            } else {
                LoraLinear::new(to_f32(half.weight().unwrap()), half.bias().map(to_f32))
            };
            full.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
            let y_half = half.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
            let y_full = full.forward(&x).unwrap();
            let scale = max_abs_diff(&y_full, &y_full.zeros_like().unwrap());
            assert!(max_abs_diff(&y_half, &y_full) <= 0.02 * scale.max(1.0));
            let w0 = half.weight().unwrap().copy().unwrap();
            let merged = half.prepare_merge().unwrap();
            half.commit_merge(merged);
            assert_eq!(half.weight().unwrap().dtype(), DType::BF16);
            let merged_full = full.prepare_merge().unwrap().into_tensor();
            let expected = merged_full.to_dtype(DType::BF16).unwrap();
            // At most one bf16 ulp (2^-7 relative) where the two f32 sums round differently.
            let w_scale = max_abs_diff(&expected, &expected.zeros_like().unwrap());
            assert!(max_abs_diff(half.weight().unwrap(), &expected) <= w_scale / 128.0);
            half.revert_merge().unwrap();
            assert_eq!(max_abs_diff(half.weight().unwrap(), &w0), 0.0);
        }
    }

    #[test]
    fn dora_is_refused_in_mixed_adapter_batches() {
        let mut l = dora_layer(false, DType::F32, 0.0);
        let plain = l.fresh_adapter(&LayerConfig::new(2, 4.0), 2).unwrap();
        l.insert_adapter("plain", plain).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 5), &Device::Cpu).unwrap();
        let err = l
            .forward_with_adapters(&x, &[Some(DEFAULT_ADAPTER), None])
            .unwrap_err();
        assert!(matches!(err, LayerError::Refused(_)), "{err:?}");
        assert!(err.to_string().contains("DoRA"), "{err}");
        // Rows of the plain adapter only: the DoRA adapter is in the stacks, never selected.
        l.forward_with_adapters(&x, &[Some("plain"), None]).unwrap();
    }
}
