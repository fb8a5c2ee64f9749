//! [`LoraLinear`]: a frozen linear layer plus an optional trainable low-rank adapter.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Linear, Module};
//! use lora_runtime::{LayerConfig, LoraLinear};
//!
//! let dev = Device::Cpu;
//! let base = Linear::new(Tensor::randn(0f32, 1., (32, 16), &dev)?, None);
//! let x = Tensor::randn(0f32, 1., (4, 16), &dev)?;
//! let y_base = base.forward(&x)?;
//!
//! let mut layer = LoraLinear::from(base);
//! layer.init_adapter(&LayerConfig::new(4, 8.0), 0)?;
//! // B starts at zero: a fresh adapter does not change the output.
//! assert_eq!(layer.forward(&x)?.to_vec2::<f32>()?, y_base.to_vec2::<f32>()?);
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use candle_core::{DType, Module, Tensor, Var, D};
use candle_nn::Linear;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use std::collections::BTreeMap;

use crate::batched::Routing;
use crate::config::{scaling, LayerConfig, LoraInit};
use crate::cpu_kernels;
use crate::error::{Error, Result};

/// The name of the adapter that [`load_adapter`](crate::LoraModel::load_adapter) and
/// [`init_adapter`](crate::LoraModel::init_adapter) create, as in PEFT.
pub const DEFAULT_ADAPTER: &str = "default";

/// A trainable low-rank adapter: `A [r, in]`, `B [out, r]` and the scaling of `B A`.
#[derive(Debug, Clone)]
pub struct Adapter {
    a: Var,
    b: Var,
    alpha: f64,
    use_rslora: bool,
    dropout: f32,
}

impl Adapter {
    /// Builds an adapter from its factors.
    ///
    /// # Errors
    /// [`Error::Layer`] when `A` and `B` are not matrices or their ranks disagree,
    /// [`Error::InvalidConfig`] for a non-positive alpha or a dropout outside `[0, 1)`.
    pub fn new(a: Var, b: Var, alpha: f64, use_rslora: bool, dropout: f32) -> Result<Self> {
        let (r, _) = a.dims2().map_err(|_| {
            Error::layer(
                "",
                format!("lora_A must be a matrix [r, in], got {:?}", a.dims()),
            )
        })?;
        let (_, rb) = b.dims2().map_err(|_| {
            Error::layer(
                "",
                format!("lora_B must be a matrix [out, r], got {:?}", b.dims()),
            )
        })?;
        if r != rb {
            return Err(Error::layer(
                "",
                format!("lora_A has rank {r} but lora_B has rank {rb}"),
            ));
        }
        LayerConfig::new(r, alpha)
            .with_dropout(dropout)
            .validate()?;
        Ok(Self {
            a,
            b,
            alpha,
            use_rslora,
            dropout,
        })
    }

    /// `A`, shape `[r, in]`.
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// `B`, shape `[out, r]`.
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }
    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// Whether rsLoRA scaling is used.
    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }
    /// The dropout probability of the LoRA branch in training mode.
    pub fn dropout(&self) -> f32 {
        self.dropout
    }
    /// The factor applied to `B A`.
    pub fn scaling(&self) -> f64 {
        scaling(self.rank(), self.alpha, self.use_rslora)
    }
    /// Number of trainable parameters: `r * (in + out)`.
    pub fn num_parameters(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }
}

/// A linear layer with a frozen base weight and an optional LoRA adapter.
///
/// The forward pass is `x W^T + b + s * ((dropout(x) A^T) B^T)`; `B A` is never formed.
/// Built from a [`candle_nn::Linear`] with `.into()`; without an adapter its output is
/// bit-identical to the base layer's.
///
/// The base weight and bias are detached plain tensors: no gradient flows into them. (For a
/// full fine-tuning baseline, [`LoraLinear::new_unfrozen`] keeps them attached.)
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// The base layer, with the weight as `[out, in]` (a transposed view for `fan_in_fan_out`).
    base: Linear,
    /// The weight as stored: `[out, in]`, or `[in, out]` when `fan_in_fan_out`.
    weight: Tensor,
    fan_in_fan_out: bool,
    adapter: Option<Adapter>,
    /// The name of the active adapter (the one in `adapter`), `None` for the base alone.
    active_name: Option<String>,
    /// The other, inactive named adapters.
    others: BTreeMap<String, Adapter>,
    /// Per-row adapters of a mixed-adapter batch (see [`crate::LoraModel::set_batch_adapters`]).
    routing: Option<Routing>,
    /// Training mode: dropout on the LoRA branch, merged layers refused.
    training: bool,
    /// While merged: the weight before the merge, kept for a bit-exact `unmerge()`.
    unmerged_weight: Option<Tensor>,
}

impl From<Linear> for LoraLinear {
    fn from(linear: Linear) -> Self {
        Self::new(linear.weight().detach(), linear.bias().map(Tensor::detach))
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
    pub fn from_conv1d(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        weight.dims2()?;
        Ok(Self::build(weight.detach(), bias.map(|b| b.detach()), true))
    }

    /// Like `From<Linear>` but keeps the base weight and bias attached to their variables, so a
    /// full fine-tuning baseline can train them. LoRA training should use `.into()` instead.
    pub fn new_unfrozen(linear: Linear) -> Self {
        Self::build(linear.weight().clone(), linear.bias().cloned(), false)
    }

    fn build(weight: Tensor, bias: Option<Tensor>, fan_in_fan_out: bool) -> Self {
        let as_out_in = if fan_in_fan_out {
            // A transposed view: `Linear::forward` transposes it back, so `x W` runs on the
            // stored `[in, out]` layout without a copy.
            weight.t().unwrap_or_else(|_| weight.clone())
        } else {
            weight.clone()
        };
        Self {
            base: Linear::new(as_out_in, bias),
            weight,
            fan_in_fan_out,
            adapter: None,
            active_name: Some(DEFAULT_ADAPTER.to_string()),
            others: BTreeMap::new(),
            routing: None,
            training: false,
            unmerged_weight: None,
        }
    }

    /// The weight as stored (`[out, in]`, or `[in, out]` with `fan_in_fan_out`); merged when
    /// [`is_merged`](Self::is_merged).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.base.weight().dim(1).unwrap_or(0)
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.base.weight().dim(0).unwrap_or(0)
    }
    /// Whether the weight is stored `[in, out]` (GPT-2 `Conv1D`).
    pub fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }
    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }
    /// The weight without the adapter: [`weight`](Self::weight), or while merged the weight
    /// from before the merge. This is what adapter files fingerprint.
    pub fn base_weight(&self) -> &Tensor {
        self.unmerged_weight.as_ref().unwrap_or(&self.weight)
    }
    /// Whether the adapter is folded into the weight.
    pub fn is_merged(&self) -> bool {
        self.unmerged_weight.is_some()
    }

    /// Replaces (or with `None` removes) the adapter.
    ///
    /// # Errors
    /// [`Error::Merged`] when merged; [`Error::Layer`] when the factors' shapes do not fit the
    /// layer.
    pub fn set_adapter(&mut self, adapter: Option<Adapter>) -> Result<()> {
        if self.is_merged() {
            return Err(Error::Merged {
                path: String::new(),
            });
        }
        if let Some(ad) = &adapter {
            self.check_adapter_shapes(ad.a.dims(), ad.b.dims(), "")?;
        }
        self.adapter = adapter;
        Ok(())
    }

    pub(crate) fn check_adapter_shapes(&self, a: &[usize], b: &[usize], path: &str) -> Result<()> {
        let (inp, out) = (self.in_features(), self.out_features());
        if a.len() != 2 || a[1] != inp {
            return Err(Error::layer(
                path,
                format!("lora_A has shape {a:?}, expected [r, {inp}]"),
            ));
        }
        if b.len() != 2 || b[0] != out || b[1] != a[0] {
            return Err(Error::layer(
                path,
                format!("lora_B has shape {b:?}, expected [{out}, {}]", a[0]),
            ));
        }
        Ok(())
    }

    /// A fresh adapter for this layer with the given hyper-parameters: `A` random as
    /// `config.init` says (from a generator seeded with `seed`), `B = 0`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for invalid hyper-parameters.
    pub fn fresh_adapter(&self, config: &LayerConfig, seed: u64) -> Result<Adapter> {
        config.validate()?;
        let (r, inp, out) = (config.rank, self.in_features(), self.out_features());
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = match config.init {
            LoraInit::Kaiming => {
                // kaiming_uniform(a = sqrt(5)) on a [r, in] weight: bound = 1 / sqrt(in).
                let bound = 1.0 / (inp as f32).sqrt();
                (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
            LoraInit::Gaussian => {
                let normal = Normal::new(0.0f32, 1.0 / r as f32)
                    .map_err(|e| Error::layer("", format!("gaussian init: {e}")))?;
                (0..r * inp).map(|_| normal.sample(&mut rng)).collect()
            }
        };
        let (dtype, device) = (self.adapter_dtype(), self.weight.device());
        let a = Tensor::from_vec(values, (r, inp), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out, r), dtype, device)?;
        Adapter::new(
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            config.alpha,
            config.use_rslora,
            config.dropout,
        )
    }

    /// The dtype adapters of this layer use: the weight's, except that f16 and bf16 layers keep
    /// f32 factors (as PEFT's `autocast_adapter_dtype` does), so small updates are not lost to
    /// rounding; the LoRA branch then runs in f32 and its result is cast back.
    pub fn adapter_dtype(&self) -> DType {
        match self.weight.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        }
    }

    /// Attaches a fresh adapter (see [`fresh_adapter`](Self::fresh_adapter)) and returns it.
    ///
    /// # Errors
    /// [`Error::Merged`] when merged, [`Error::InvalidConfig`] for invalid hyper-parameters.
    pub fn init_adapter(&mut self, config: &LayerConfig, seed: u64) -> Result<&Adapter> {
        if self.is_merged() {
            return Err(Error::Merged {
                path: String::new(),
            });
        }
        let adapter = self.fresh_adapter(config, seed)?;
        Ok(self.adapter.insert(adapter))
    }

    /// `s * B A` in f32, in the layout of the stored weight (transposed for `fan_in_fan_out`).
    /// Detached: no gradient flows through it.
    ///
    /// # Errors
    /// [`Error::Layer`] when the layer has no adapter.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let ad = self
            .adapter
            .as_ref()
            .ok_or_else(|| Error::layer("", "the layer has no adapter"))?;
        let a = ad.a.as_tensor().detach().to_dtype(DType::F32)?;
        // Scale the small factor B rather than the [out, in] product: one pass fewer.
        let b =
            ad.b.as_tensor()
                .detach()
                .to_dtype(DType::F32)?
                .affine(ad.scaling(), 0.0)?;
        let delta = b.matmul(&a)?;
        Ok(if self.fan_in_fan_out {
            delta.t()?
        } else {
            delta
        })
    }

    /// The merged weight `W + s B A` (computed in f32, cast to the weight's dtype), checked to be
    /// finite. Does not change the layer.
    pub(crate) fn merged_weight(&self, path: &str) -> Result<Tensor> {
        if self.is_merged() {
            return Err(Error::Merged {
                path: path.to_string(),
            });
        }
        if let Some(merged) = self.merged_weight_f32_cpu().map_err(|e| relabel(e, path))? {
            return merged.ok_or_else(|| Error::NonFinite {
                path: path.to_string(),
            });
        }
        let delta = self.delta_weight().map_err(|e| relabel(e, path))?;
        let dtype = self.weight.dtype();
        let merged = if dtype == DType::F32 {
            (&self.weight + delta)?
        } else {
            (self.weight.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?
        };
        if !all_finite(&merged)? {
            return Err(Error::NonFinite {
                path: path.to_string(),
            });
        }
        Ok(merged)
    }

    /// The CPU fast path of [`merged_weight`](Self::merged_weight) for an f32 layer: `W + s B A`
    /// in one pass over `W` with the finite check folded in (see `cpu_kernels::add_low_rank`).
    /// `None` when it does not apply; `Some(None)` when the result would not be finite.
    fn merged_weight_f32_cpu(&self) -> Result<Option<Option<Tensor>>> {
        let Some(ad) = &self.adapter else {
            return Err(Error::layer("", "the layer has no adapter"));
        };
        let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
        let on_cpu_f32 =
            |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), candle_core::Device::Cpu);
        if !(on_cpu_f32(&self.weight) && on_cpu_f32(a) && on_cpu_f32(b)) {
            return Ok(None);
        }
        let (rows, cols) = self.weight.dims2()?;
        let (guard, layout) = self.weight.storage_and_layout();
        let (candle_core::Storage::Cpu(storage), Some((start, end))) =
            (&*guard, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        let w = &storage.as_slice::<f32>()?[start..end];
        let sb = b.detach().affine(ad.scaling(), 0.0)?;
        // W [out, in] += sB [out, r] A [r, in]; stored [in, out] (fan_in_fan_out): += A^T (sB)^T.
        let (l, rt) = if self.fan_in_fan_out {
            (a.t()?, sb.t()?)
        } else {
            (sb, a.detach())
        };
        let l = l.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let rt = rt.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; w.len()];
        let finite = cpu_kernels::add_low_rank(w, &l, &rt, ad.rank(), cols, &mut out);
        drop(guard);
        if !finite {
            return Ok(Some(None));
        }
        Ok(Some(Some(Tensor::from_vec(
            out,
            (rows, cols),
            self.weight.device(),
        )?)))
    }

    /// Installs a weight computed by [`merged_weight`](Self::merged_weight). Cannot fail.
    pub(crate) fn commit_merge(&mut self, merged: Tensor) {
        // A mixed-adapter routing would add its deltas on top of the merged weight.
        self.routing = None;
        let original = std::mem::replace(&mut self.weight, merged);
        self.unmerged_weight = Some(original);
        self.rebuild_base();
    }

    fn rebuild_base(&mut self) {
        let bias = self.base.bias().cloned();
        let as_out_in = if self.fan_in_fan_out {
            self.weight.t().unwrap_or_else(|_| self.weight.clone())
        } else {
            self.weight.clone()
        };
        self.base = Linear::new(as_out_in, bias);
    }

    /// Installs an adapter whose shapes were already checked against this layer.
    /// Makes [`DEFAULT_ADAPTER`] active and replaces it with `adapter`.
    pub(crate) fn install_adapter(&mut self, adapter: Option<Adapter>) {
        self.activate(Some(DEFAULT_ADAPTER));
        self.adapter = adapter;
        self.routing = None;
    }

    /// Replaces (or with `None` removes) the adapter `name`, active or not.
    pub(crate) fn install_named(&mut self, name: &str, adapter: Option<Adapter>) {
        self.routing = None;
        if self.active_name.as_deref() == Some(name) {
            self.adapter = adapter;
        } else if let Some(ad) = adapter {
            self.others.insert(name.to_string(), ad);
        } else {
            self.others.remove(name);
        }
    }

    /// Makes `name` the active adapter (`None`: the base alone). The caller checks the layer is
    /// not merged. A name this layer has no adapter for leaves it running the base alone.
    pub(crate) fn activate(&mut self, name: Option<&str>) {
        if self.active_name.as_deref() == name {
            return;
        }
        if let (Some(ad), Some(current)) = (self.adapter.take(), self.active_name.take()) {
            self.others.insert(current, ad);
        }
        self.adapter = name.and_then(|n| self.others.remove(n));
        self.active_name = name.map(str::to_string);
    }

    /// The name of the active adapter (`None`: the base alone).
    pub fn active_adapter_name(&self) -> Option<&str> {
        self.active_name.as_deref()
    }

    /// The names of this layer's adapters, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.others.keys().map(String::as_str).collect();
        if let (Some(_), Some(n)) = (&self.adapter, &self.active_name) {
            names.push(n);
        }
        names.sort_unstable();
        names
    }

    /// The adapter called `name`, active or not.
    pub fn adapter_named(&self, name: &str) -> Option<&Adapter> {
        if self.active_name.as_deref() == Some(name) {
            self.adapter.as_ref()
        } else {
            self.others.get(name)
        }
    }

    /// Sets the per-row adapters of the next forwards (see
    /// [`LoraModel::set_batch_adapters`](crate::LoraModel::set_batch_adapters)).
    pub(crate) fn set_routing(&mut self, routing: Option<Routing>) {
        self.routing = routing;
    }

    /// A forward in which row `i` of `x [b, .., in]` uses the adapter `rows[i]` (`None`: the
    /// base alone): all rows in one pass, with the stacked factors gathered per row and two
    /// batched matmuls. Equal to running each row alone with its adapter active.
    ///
    /// # Errors
    /// [`Error::Merged`] when merged, [`Error::Layer`] for an adapter name this layer does not
    /// have or a row count that does not match `x`.
    pub fn forward_with_adapters(&self, x: &Tensor, rows: &[Option<&str>]) -> Result<Tensor> {
        if self.is_merged() {
            return Err(Error::Merged {
                path: String::new(),
            });
        }
        let routing = self.routing_for(rows, "")?;
        let y = self.base.forward(x)?;
        Ok((y + routing.term(x)?)?)
    }

    /// The routing of `rows` over this layer's adapters; names it lacks are an error.
    pub(crate) fn routing_for(&self, rows: &[Option<&str>], path: &str) -> Result<Routing> {
        let names = self.adapter_names();
        let mut used: Vec<&str> = Vec::new();
        let mut slots = Vec::with_capacity(rows.len());
        for row in rows {
            slots.push(match row {
                None => None,
                Some(name) => {
                    if !names.contains(name) {
                        return Err(Error::layer(
                            path,
                            format!("no adapter named `{name}` (adapters: {names:?})"),
                        ));
                    }
                    Some(match used.iter().position(|u| u == name) {
                        Some(i) => i,
                        None => {
                            used.push(name);
                            used.len() - 1
                        }
                    })
                }
            });
        }
        let adapters: Vec<&Adapter> = used.iter().filter_map(|n| self.adapter_named(n)).collect();
        Routing::new(
            &adapters,
            &slots,
            self.in_features(),
            self.out_features(),
            self.adapter_dtype(),
            self.weight.device(),
            path,
        )
    }

    /// Folds `s * B A` into the weight: afterwards a forward is the base layer's single matmul.
    ///
    /// The weight from before the merge is kept (a reference to the same memory, no copy), so
    /// [`unmerge`](Self::unmerge) restores it bit for bit; the price is that the merged and the
    /// original weight both live in memory while merged. Use
    /// [`merge_and_unload`](Self::merge_and_unload) to drop the original and the adapter.
    ///
    /// # Errors
    /// [`Error::Merged`] when already merged, [`Error::Layer`] without adapter,
    /// [`Error::NonFinite`] when the merged weight would hold NaN or inf (the layer is unchanged).
    pub fn merge(&mut self) -> Result<()> {
        let merged = self.merged_weight("")?;
        self.commit_merge(merged);
        Ok(())
    }

    /// Restores the weight from before [`merge`](Self::merge), bit for bit.
    ///
    /// # Errors
    /// [`Error::NotMerged`] when not merged.
    pub fn unmerge(&mut self) -> Result<()> {
        let original = self.unmerged_weight.take().ok_or(Error::NotMerged {
            path: String::new(),
        })?;
        self.weight = original;
        self.rebuild_base();
        Ok(())
    }

    /// Merges (if not merged yet), then drops the adapter and the original weight: the layer
    /// becomes a plain linear layer with the merged weight and no extra memory.
    ///
    /// # Errors
    /// As [`merge`](Self::merge), except that an already merged layer is fine.
    pub fn merge_and_unload(&mut self) -> Result<()> {
        if !self.is_merged() {
            self.merge()?;
        }
        self.unmerged_weight = None;
        self.adapter = None;
        self.others.clear();
        self.routing = None;
        Ok(())
    }

    /// The input width and the output shape for an input `[..., in]`.
    fn flat_dims(&self, x: &Tensor) -> candle_core::Result<(usize, Vec<usize>)> {
        let inp = x.dim(D::Minus1)?;
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        Ok((inp, out_dims))
    }

    /// `s * (x A^T)` for `x [n, in]`: the thin `[n, r]` product, scaled there rather than on the
    /// `[n, out]` output.
    fn lora_hidden(&self, ad: &Adapter, x2: &Tensor) -> candle_core::Result<Tensor> {
        x2.to_dtype(ad.a.dtype())?
            .matmul(&ad.a.as_tensor().t()?)?
            .affine(ad.scaling(), 0.0)
    }

    /// The LoRA branch `s * ((x A^T) B^T)` for an input `[..., in]`.
    fn lora_term(&self, ad: &Adapter, x: &Tensor) -> candle_core::Result<Tensor> {
        let (inp, out_dims) = self.flat_dims(x)?;
        let n = x.elem_count() / inp.max(1);
        let h = self.lora_hidden(ad, &x.reshape((n, inp))?)?;
        let d = h.matmul(&ad.b.as_tensor().t()?)?;
        d.reshape(out_dims)?.to_dtype(x.dtype())
    }
}

fn relabel(e: Error, path: &str) -> Error {
    match e {
        Error::Layer { reason, .. } => Error::Layer {
            path: path.to_string(),
            reason,
        },
        other => other,
    }
}

/// True when every element is finite. One reduction; a second exact pass only when the sum is
/// not finite (a sum of finite values can overflow).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    let t32 = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let sum = t32.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(true);
    }
    // x - x is 0 for finite x and NaN for NaN or inf, and a sum of zeros cannot overflow.
    #[allow(clippy::eq_op)] // deliberate: x - x tells finite from non-finite
    let zeros = (&t32 - &t32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(zeros == 0.0)
}

impl LoraLinear {
    /// Whether the layer is in training mode (see [`set_training`](Self::set_training)).
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Switches training mode, in which [`Module::forward`] applies the adapter's dropout and a
    /// merged layer is refused. Layers start in inference mode. On a whole model use
    /// [`LoraModel::set_training`](crate::LoraModel::set_training).
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
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
            return self.base.forward(x)? + routing.term(x)?;
        }
        let Some(ad) = &self.adapter else {
            return self.base.forward(x);
        };
        if self.is_merged() {
            if train {
                return Err(candle_core::Error::msg(
                    "LoraLinear: cannot train a merged layer, call `unmerge()` first",
                ));
            }
            return self.base.forward(x);
        }
        let dropped;
        let x_lora = if train && ad.dropout > 0.0 {
            dropped = candle_nn::ops::dropout(x, ad.dropout)?;
            &dropped
        } else {
            x
        };
        let (weight, bias) = (self.base.weight(), self.base.bias());
        if cpu_kernels::fused_applies(x, ad.a.as_tensor(), ad.b.as_tensor(), weight, bias) {
            // One output buffer, no `[n, out]` temporary, no extra add pass (see `cpu_kernels`).
            let (inp, out_dims) = self.flat_dims(x)?;
            let n = x.elem_count() / inp.max(1);
            let h = self.lora_hidden(ad, &x_lora.reshape((n, inp))?)?;
            let y = cpu_kernels::fused_forward(
                &x.reshape((n, inp))?,
                &h,
                ad.b.as_tensor(),
                weight,
                bias,
            )?;
            return y.reshape(out_dims);
        }
        let y = self.base.forward(x)?;
        y + self.lora_term(ad, x_lora)?
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
    use candle_core::Device;

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

    #[test]
    fn merge_is_exactly_reversible_and_refuses_twice() {
        for fifo in [false, true] {
            let mut l = layer(fifo);
            l.init_adapter(&LayerConfig::new(2, 4.0), 1).unwrap();
            let b = Tensor::randn(0f32, 1.0, (6, 2), &Device::Cpu).unwrap();
            l.adapter.as_ref().unwrap().b.set(&b).unwrap();
            let w0 = l.weight().to_vec2::<f32>().unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
            let y0 = l.forward(&x).unwrap();
            l.merge().unwrap();
            assert!(matches!(l.merge(), Err(Error::Merged { .. })));
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
            l.unmerge().unwrap();
            assert_eq!(l.weight().to_vec2::<f32>().unwrap(), w0);
            assert!(matches!(l.unmerge(), Err(Error::NotMerged { .. })));
        }
    }

    #[test]
    fn non_finite_merge_leaves_layer_unchanged() {
        let mut l = layer(false);
        l.init_adapter(&LayerConfig::new(2, 4.0), 1).unwrap();
        let b = Tensor::full(f32::INFINITY, (6, 2), &Device::Cpu).unwrap();
        l.adapter.as_ref().unwrap().b.set(&b).unwrap();
        let w0 = l.weight().to_vec2::<f32>().unwrap();
        assert!(matches!(l.merge(), Err(Error::NonFinite { .. })));
        assert!(!l.is_merged());
        assert_eq!(l.weight().to_vec2::<f32>().unwrap(), w0);
    }
}
