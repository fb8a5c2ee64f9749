//! [`LoraConv1d`] and [`LoraConv2d`]: frozen convolutions plus named LoRA adapters, as PEFT's
//! `lora.Conv1d` / `lora.Conv2d`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_nn::{Conv2d, Conv2dConfig, Module, VarMap};
//! use lora_runtime::{LoraConv2d, LoraLayer, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let config = Conv2dConfig { padding: 1, ..Default::default() };
//! let base = Conv2d::new(Tensor::randn(0f32, 1., (8, 3, 3, 3), &dev)?, None, config);
//! let x = Tensor::randn(0f32, 1., (2, 3, 10, 10), &dev)?;
//! let y_base = base.forward(&x)?;
//!
//! let mut layer = LoraConv2d::from(base);
//! layer.init_adapter(&VarMap::new())?;
//! // PEFT's layout: A is a 3x3 convolution to r channels, B a 1x1 convolution back.
//! let ad = layer.adapter().expect("an adapter");
//! assert_eq!((ad.a().dims(), ad.b().dims()), (&[8, 3, 3, 3][..], &[8, 8, 1, 1][..]));
//! // B starts at zero: a fresh adapter does not change the output.
//! let same = layer.forward(&x)?.flatten_all()?.to_vec1::<f32>()? == y_base.flatten_all()?.to_vec1::<f32>()?;
//! assert!(same);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;

use candle_core::{DType, Device, Module, Tensor};

use crate::adapter::{Adapter, AdapterSet};
use crate::config::LayerConfig;
use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::layer::weight::BaseWeight;
use crate::layer::{LoraLayer, MergedWeight};
use crate::layout::FactorLayout;
use crate::rng::DropoutRng;
use crate::routing::Routing;

/// The hyper-parameters of a convolution, shared by both kinds (candle's `Conv1dConfig` and
/// `Conv2dConfig` hold the same fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
}

/// What both convolution kinds hold and do; they differ only in the candle op they call.
#[derive(Debug, Clone)]
struct ConvCore {
    /// The kernel `[out, in / groups, k...]`; merged while merged.
    weight: BaseWeight,
    bias: Option<Tensor>,
    geometry: Geometry,
    /// 1 or 2 spatial dimensions.
    spatial: usize,
    adapters: AdapterSet,
    training: bool,
    dropout_rng: Option<DropoutRng>,
}

impl ConvCore {
    fn new(weight: Tensor, bias: Option<Tensor>, geometry: Geometry, spatial: usize) -> Self {
        Self {
            weight: BaseWeight::new(weight),
            bias,
            geometry,
            spatial,
            adapters: AdapterSet::default(),
            training: false,
            dropout_rng: None,
        }
    }

    fn dim(&self, i: usize) -> usize {
        self.weight.current().dims().get(i).copied().unwrap_or(0)
    }
    fn out_channels(&self) -> usize {
        self.dim(0)
    }
    /// The input channels: the kernel's second dimension times the groups.
    fn in_channels(&self) -> usize {
        self.dim(1) * self.geometry.groups
    }
    fn kernel(&self) -> &[usize] {
        self.weight.current().dims().get(2..).unwrap_or(&[])
    }
    fn is_merged(&self) -> bool {
        self.weight.is_merged()
    }

    /// `x` convolved with `kernel` by this layer's op.
    fn conv(&self, x: &Tensor, kernel: &Tensor, g: Geometry) -> candle_core::Result<Tensor> {
        if self.spatial == 1 {
            x.conv1d(kernel, g.padding, g.stride, g.dilation, g.groups)
        } else {
            x.conv2d(kernel, g.padding, g.stride, g.dilation, g.groups)
        }
    }

    /// The base convolution plus its bias.
    fn base_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.conv(x, self.weight.current(), self.geometry)?;
        match &self.bias {
            None => Ok(y),
            Some(bias) => {
                let mut shape = vec![1, bias.elem_count()];
                shape.extend(std::iter::repeat_n(1, self.spatial));
                y.broadcast_add(&bias.reshape(shape)?)
            }
        }
    }

    /// Grouped convolutions are refused: PEFT gives their `B` groups and cannot merge them.
    fn check_groups(&self) -> LayerResult<()> {
        match self.geometry.groups {
            1 => Ok(()),
            groups => Err(LayerError::Refused(format!(
                "LoRA on a grouped convolution (groups = {groups}) is not supported: PEFT cannot \
                 merge such adapters either; leave this layer out of the targets"
            ))),
        }
    }

    fn factor_layout(&self, rank: usize) -> FactorLayout {
        FactorLayout::conv(self.in_channels(), self.out_channels(), self.kernel(), rank)
    }

    /// `s * B A` of the active adapter in f32, shaped like the kernel (PEFT's
    /// `get_delta_weight`: `B [out, r]` times `A [r, in * k...]`).
    fn delta_weight(&self) -> LayerResult<Tensor> {
        let delta = self
            .adapters
            .active()
            .ok_or(LayerError::NoAdapter)?
            .delta()?;
        Ok(delta.reshape(self.weight.current().dims())?)
    }

    /// `conv(x) + s * B(A(dropout(x)))`: `A` with the layer's kernel, padding, stride and
    /// dilation, `B` a 1x1 convolution.
    fn forward_t(&self, x: &Tensor, train: bool, kind: &str) -> candle_core::Result<Tensor> {
        let base = self.base_forward(x)?;
        let Some(ad) = self.adapters.active() else {
            return Ok(base);
        };
        if self.is_merged() {
            if train {
                return Err(candle_core::Error::msg(format!(
                    "{kind}: cannot train a merged layer, call `unmerge()` first"
                )));
            }
            return Ok(base);
        }
        let dropped;
        let x_lora = if train && ad.dropout() > 0.0 {
            dropped = match &self.dropout_rng {
                Some(rng) => rng.dropout(x, ad.dropout())?,
                None => candle_nn::ops::dropout(x, ad.dropout())?,
            };
            &dropped
        } else {
            x
        };
        let x_lora = x_lora.to_dtype(ad.a().dtype())?;
        // A as a matmul over the unfolded input, B as a matmul over channels: the same values
        // as two convolutions, with gradients through matmul and index_select only (candle
        // 0.11's conv1d kernel gradient is wrong, and its conv input gradient breaks for some
        // strides).
        let (cols, out) = unfold(&x_lora, self.kernel(), self.geometry)?;
        let a = ad.a().as_tensor().flatten_from(1)?;
        let b = ad.b().as_tensor().flatten_from(1)?;
        let h = a.broadcast_matmul(&cols)?;
        let y = b.broadcast_matmul(&h)?.affine(ad.scaling(), 0.0)?;
        let mut shape = vec![x.dim(0)?, self.out_channels()];
        shape.extend(out);
        let term = y.reshape(shape)?;
        let term = term.to_dtype(base.dtype())?;
        base + term
    }

    fn adapter_dtype(&self) -> DType {
        match self.weight.current().dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        }
    }

    fn base_fingerprint(&self) -> LayerResult<BaseFingerprint> {
        self.weight.fingerprint()
    }

    fn prepare_merge(&self) -> LayerResult<MergedWeight> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        self.check_groups()?;
        self.weight.plus(&self.delta_weight()?)
    }

    fn commit_merge(&mut self, merged: MergedWeight) {
        self.weight.commit(merged);
    }

    fn revert_merge(&mut self) -> LayerResult<()> {
        self.weight.revert()
    }

    fn unload(&mut self) {
        self.weight.unload();
        self.adapters.clear();
    }
}

/// `x [b, c, spatial...]` unfolded for a convolution with kernel sizes `kernel` (im2col):
/// `[b, c * k..., positions]`, with the columns ordered as a kernel `[c, k...]` flattens, and
/// the output's spatial sizes. Built from zero padding and `index_select`, so its gradient is
/// exact.
fn unfold(x: &Tensor, kernel: &[usize], g: Geometry) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let (batch, channels) = (x.dim(0)?, x.dim(1)?);
    let mut cols = x.clone();
    let mut out = Vec::with_capacity(kernel.len());
    for (i, &k) in kernel.iter().enumerate() {
        let axis = 2 + i;
        if g.padding > 0 {
            cols = cols.pad_with_zeros(axis, g.padding, g.padding)?;
        }
        let len = cols.dim(axis)?;
        let span = g.dilation * k.saturating_sub(1) + 1;
        if len < span || g.stride == 0 {
            candle_core::bail!(
                "convolution input of size {} (padded) along spatial axis {i} is smaller than the kernel's span {span}",
                len
            );
        }
        let positions = (len - span) / g.stride + 1;
        let index: Vec<u32> = (0..k)
            .flat_map(|t| (0..positions).map(move |j| (t * g.dilation + j * g.stride) as u32))
            .collect();
        let index = Tensor::from_vec(index, k * positions, x.device())?;
        cols = cols.index_select(&index, axis)?;
        out.push(positions);
    }
    let taps: usize = kernel.iter().product();
    let positions: usize = out.iter().product();
    let cols = match (kernel, out.as_slice()) {
        // [b, c, k0, o0, k1, o1] -> [b, c, k0, k1, o0, o1]
        (&[k0, k1], &[o0, o1]) => cols
            .reshape((batch, channels, k0, o0, k1, o1))?
            .permute((0, 1, 2, 4, 3, 5))?,
        _ => cols,
    };
    Ok((cols.reshape((batch, channels * taps, positions))?, out))
}

/// Implements the public API and [`LoraLayer`] of a convolution kind over its `ConvCore`.
macro_rules! lora_conv {
    ($name:ident, $candle:ty, $config:ty, $spatial:literal, $what:literal) => {
        #[doc = concat!("A ", $what, " convolution with a frozen kernel and named LoRA adapters, in PEFT's layout.")]
        ///
        /// `A [r, in, k...]` is a convolution with the layer's kernel size, padding, stride and
        /// dilation, `B [out, r, 1...]` a 1x1 convolution; the forward pass is
        /// `conv(x) + s * B(A(dropout(x)))` and the merged kernel `W + s * B A` (the factors
        /// flattened to `[out, r]` and `[r, in * k...]`), as PEFT's `get_delta_weight`.
        /// Grouped convolutions (`groups > 1`) take no adapter: PEFT cannot merge them. `A` uses
        /// the layer's dilation, so the unmerged forward equals the merged kernel's; PEFT 0.21.2
        /// builds its `lora_A` without the dilation, and its forward fails on a shape mismatch for
        /// a dilated layer.
        ///
        #[doc = concat!("Built from a [`", stringify!($candle), "`] with `.into()`; without an adapter its output is")]
        /// bit-identical to the base layer's. The kernel and bias are detached plain tensors.
        #[derive(Debug, Clone)]
        pub struct $name(ConvCore);

        impl From<$candle> for $name {
            /// Freezes a candle convolution.
            fn from(conv: $candle) -> Self {
                let c = conv.config();
                let geometry = Geometry {
                    padding: c.padding,
                    stride: c.stride,
                    dilation: c.dilation,
                    groups: c.groups.max(1),
                };
                Self(ConvCore::new(
                    conv.weight().detach(),
                    conv.bias().map(Tensor::detach),
                    geometry,
                    $spatial,
                ))
            }
        }

        impl $name {
            #[doc = concat!("A layer without adapter from a kernel `[out, in / groups, k...]` (", $spatial, " kernel dimension(s)), an optional bias `[out]` and candle's config.")]
            ///
            /// # Errors
            /// When the kernel has the wrong number of dimensions.
            pub fn new(
                weight: Tensor,
                bias: Option<Tensor>,
                config: $config,
            ) -> candle_core::Result<Self> {
                if weight.rank() != 2 + $spatial {
                    candle_core::bail!(
                        "{}: the kernel must have {} dimensions, got shape {:?}",
                        stringify!($name),
                        2 + $spatial,
                        weight.dims()
                    );
                }
                Ok(<$candle>::new(weight, bias, config).into())
            }
            /// The kernel `[out, in / groups, k...]`; merged when merged.
            pub fn weight(&self) -> &Tensor {
                self.0.weight.current()
            }
            /// The bias, if any.
            pub fn bias(&self) -> Option<&Tensor> {
                self.0.bias.as_ref()
            }
            /// The active adapter, if any.
            pub fn adapter(&self) -> Option<&Adapter> {
                self.0.adapters.active()
            }
            /// Whether an adapter is folded into the kernel.
            pub fn is_merged(&self) -> bool {
                self.0.is_merged()
            }
            /// Whether the layer is in training mode (dropout on the LoRA branch).
            pub fn is_training(&self) -> bool {
                self.0.training
            }
            /// Switches training mode. Layers start in inference mode.
            pub fn set_training(&mut self, training: bool) {
                self.0.training = training;
            }
            /// `s * B A` of the active adapter in f32, shaped like the kernel. Detached.
            ///
            /// # Errors
            /// [`LayerError::NoAdapter`] when the layer has no active adapter.
            pub fn delta_weight(&self) -> LayerResult<Tensor> {
                self.0.delta_weight()
            }
            /// `conv(x) + s * B(A(dropout(x)))`, with dropout only when `train`.
            ///
            /// # Errors
            /// Shape errors from candle; training a merged layer.
            pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
                self.0.forward_t(x, train, stringify!($name))
            }
        }

        impl LoraLayer for $name {
            fn in_features(&self) -> usize {
                self.0.in_channels()
            }
            fn out_features(&self) -> usize {
                self.0.out_channels()
            }
            fn adapter_dtype(&self) -> DType {
                self.0.adapter_dtype()
            }
            fn device(&self) -> &Device {
                self.0.weight.current().device()
            }
            fn base_parameters(&self) -> usize {
                self.0.weight.current().elem_count() + self.0.bias.as_ref().map_or(0, Tensor::elem_count)
            }
            fn base_fingerprint(&self) -> LayerResult<BaseFingerprint> {
                self.0.base_fingerprint()
            }
            fn adapter_set(&self) -> &AdapterSet {
                &self.0.adapters
            }
            fn adapter_set_mut(&mut self) -> &mut AdapterSet {
                &mut self.0.adapters
            }
            fn is_merged(&self) -> bool {
                self.0.is_merged()
            }
            /// PEFT's conv layout: `A [r, in, k...]`, `B [out, r, 1...]`.
            fn factor_layout(&self, rank: usize) -> FactorLayout {
                self.0.factor_layout(rank)
            }
            fn check_factors(&self, a: &[usize], b: &[usize]) -> LayerResult<()> {
                self.0.check_groups()?;
                let rank = a.first().copied().unwrap_or(0);
                self.0.factor_layout(rank).check(a, b)
            }
            fn fresh_adapter(&self, config: &LayerConfig, seed: u64) -> LayerResult<Adapter> {
                self.0.check_groups()?;
                if config.use_dora {
                    return Err(LayerError::dora_unsupported());
                }
                if config.adalora.is_some() {
                    return Err(LayerError::adalora_unsupported());
                }
                Adapter::fresh_for(
                    &self.0.factor_layout(config.rank),
                    config,
                    seed,
                    self.0.adapter_dtype(),
                    self.0.weight.current().device(),
                )
            }
            fn prepare_merge(&self) -> LayerResult<MergedWeight> {
                self.0.prepare_merge()
            }
            fn commit_merge(&mut self, merged: MergedWeight) {
                self.0.commit_merge(merged)
            }
            fn revert_merge(&mut self) -> LayerResult<()> {
                self.0.revert_merge()
            }
            fn unload(&mut self) {
                self.0.unload()
            }
            /// Convolutions take no mixed-adapter batches: nothing to route.
            fn set_routing(&mut self, _routing: Option<Routing>) {}
            fn prepare_routing(&self, _rows: &[Option<&str>]) -> LayerResult<Routing> {
                Err(LayerError::Refused(
                    "mixed-adapter batches are not supported on convolution layers".into(),
                ))
            }
            fn is_training(&self) -> bool {
                self.0.training
            }
            fn set_training(&mut self, training: bool) {
                self.0.training = training;
            }
            fn set_dropout_rng(&mut self, rng: Option<DropoutRng>) {
                self.0.dropout_rng = rng;
            }
            fn as_any(&self) -> &dyn Any {
                self
            }
            fn as_any_mut(&mut self) -> &mut dyn Any {
                self
            }
        }

        impl Module for $name {
            #[doc = concat!("The forward pass in the layer's mode (see [`", stringify!($name), "::forward_t`]).")]
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                self.forward_t(x, self.0.training)
            }
        }
    };
}

lora_conv!(
    LoraConv1d,
    candle_nn::Conv1d,
    candle_nn::Conv1dConfig,
    1,
    "1-d"
);
lora_conv!(
    LoraConv2d,
    candle_nn::Conv2d,
    candle_nn::Conv2dConfig,
    2,
    "2-d"
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::DEFAULT_ADAPTER;
    use candle_core::Var;

    fn max_diff(p: &Tensor, q: &Tensor) -> f64 {
        (p - q)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A layer with an adapter whose `B` is non-zero, in f64.
    fn with_adapter<L: LoraLayer>(mut l: L, rank: usize) -> L {
        let ad = l.fresh_adapter(&LayerConfig::new(rank, 5.0), 3).unwrap();
        let b = Tensor::randn(0f64, 1.0, ad.b().dims(), &Device::Cpu).unwrap();
        ad.b().set(&b).unwrap();
        l.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
        l
    }

    fn conv2d(groups: usize, stride: usize) -> LoraConv2d {
        let dev = Device::Cpu;
        let config = candle_nn::Conv2dConfig {
            padding: 1,
            stride,
            dilation: 1,
            groups,
            cudnn_fwd_algo: None,
        };
        let w = Tensor::randn(0f64, 0.5, (4, 6 / groups, 3, 2), &dev).unwrap();
        let b = Tensor::randn(0f64, 0.5, 4, &dev).unwrap();
        LoraConv2d::new(w, Some(b), config).unwrap()
    }

    fn conv1d() -> LoraConv1d {
        let dev = Device::Cpu;
        let config = candle_nn::Conv1dConfig {
            padding: 2,
            stride: 1,
            dilation: 2,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        let w = Tensor::randn(0f64, 0.5, (5, 3, 3), &dev).unwrap();
        LoraConv1d::new(w, None, config).unwrap()
    }

    #[test]
    fn layouts_are_peft_s() {
        let l = conv2d(1, 2);
        assert_eq!(l.factor_layout(2).a(), [2, 6, 3, 2]);
        assert_eq!(l.factor_layout(2).b(), [4, 2, 1, 1]);
        let l = conv1d();
        assert_eq!(l.factor_layout(2).a(), [2, 3, 3]);
        assert_eq!(l.factor_layout(2).b(), [5, 2, 1]);
        let err = l.check_factors(&[2, 3, 2], &[5, 2, 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lora_A has shape [2, 3, 2], expected [r, 3, 3]"
        );
        let err = l.check_factors(&[2, 3, 3], &[5, 2]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lora_B has shape [5, 2], expected [5, 2, 1]"
        );
    }

    #[test]
    fn grouped_convolutions_are_refused_by_name() {
        let l = conv2d(2, 1);
        let err = l.fresh_adapter(&LayerConfig::new(2, 4.0), 0).unwrap_err();
        assert!(err.to_string().contains("groups = 2"), "{err}");
        let err = l.check_factors(&[2, 6, 3, 2], &[4, 2, 1, 1]).unwrap_err();
        assert!(err.to_string().contains("grouped convolution"), "{err}");
    }

    /// The unmerged forward equals the merged kernel's (which checks the delta's layout and
    /// A's geometry), and the unmerge restores the kernel bit for bit.
    fn merge_round_trip<L: LoraLayer + Module>(mut l: L, x: &Tensor, weight: fn(&L) -> Tensor) {
        let y = l.forward(x).unwrap();
        let w0 = weight(&l);
        let merged = l.prepare_merge().unwrap();
        l.commit_merge(merged);
        let ym = l.forward(x).unwrap();
        // The delta is computed in f32 (as for every layer kind), the rest in f64.
        assert!(max_diff(&y, &ym) < 1e-5, "{}", max_diff(&y, &ym));
        l.revert_merge().unwrap();
        assert_eq!(
            weight(&l).flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            w0.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        assert_eq!(
            l.forward(x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
    }

    #[test]
    fn merge_matches_the_unmerged_forward_and_unmerge_is_exact() {
        let x = Tensor::randn(0f64, 1.0, (2, 6, 7, 5), &Device::Cpu).unwrap();
        merge_round_trip(with_adapter(conv2d(1, 2), 3), &x, |l| l.weight().clone());
        let x = Tensor::randn(0f64, 1.0, (2, 3, 9), &Device::Cpu).unwrap();
        merge_round_trip(with_adapter(conv1d(), 2), &x, |l| l.weight().clone());
    }

    /// Gradients of `A` and `B` against central finite differences of a probe loss.
    fn check_gradients<L: LoraLayer + Module>(l: &L, x: &Tensor) {
        let ad = l.adapter().unwrap().clone();
        let y0 = l.forward(x).unwrap();
        let probe = Tensor::randn(0f64, 1.0, y0.dims(), &Device::Cpu).unwrap();
        let loss = || -> f64 {
            (l.forward(x).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (l.forward(x).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [ad.a(), ad.b()] {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let v0 = var.as_tensor().copy().unwrap();
            let flat = v0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in (0..flat.len()).step_by(3) {
                let eps = 1e-6;
                let set = |delta: f64| {
                    let mut v = flat.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, v0.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                };
                set(eps);
                let lp = loss();
                set(-eps);
                let lm = loss();
                var.set(&v0).unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-5 * fd.abs().max(1.0),
                    "{i}: {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn combinations_keep_the_kernel_layout_and_sum_the_deltas() {
        use crate::{Combination, LoraModelExt};
        let mut l = conv2d(1, 1);
        for (name, seed) in [("x", 1), ("y", 2)] {
            let ad = l.fresh_adapter(&LayerConfig::new(2, 4.0), seed).unwrap();
            let b = Tensor::randn(0f64, 1.0, ad.b().dims(), &Device::Cpu).unwrap();
            ad.b().set(&b).unwrap();
            l.insert_adapter(name, ad).unwrap();
        }
        let expected = (l.adapter_named("x").unwrap().delta().unwrap()
            + l.adapter_named("y")
                .unwrap()
                .delta()
                .unwrap()
                .affine(-0.5, 0.0)
                .unwrap())
        .unwrap();
        let parts = [("x", 1.0), ("y", -0.5)];
        for (how, name) in [
            (Combination::Cat, "cat"),
            (Combination::Svd { rank: 4 }, "svd"),
        ] {
            l.add_weighted_adapter(&parts, how, name).unwrap();
            let ad = l.adapter_named(name).unwrap();
            assert_eq!(ad.a().dims(), [4, 6, 3, 2]);
            assert_eq!(ad.b().dims(), [4, 4, 1, 1]);
            let d = max_diff(
                &ad.delta().unwrap().to_dtype(DType::F64).unwrap(),
                &expected.to_dtype(DType::F64).unwrap(),
            );
            assert!(d < 1e-5, "{name}: {d}");
        }
    }

    #[test]
    fn gradients_reach_a_and_b_and_match_finite_differences() {
        let x = Var::randn(0f64, 1.0, (2, 6, 7, 5), &Device::Cpu).unwrap();
        check_gradients(&with_adapter(conv2d(1, 1), 3), x.as_tensor());
        // With stride 2 the input is a plain tensor: candle 0.11's conv2d backward takes the
        // output padding of the input gradient from the height alone, which breaks when height
        // and width leave different remainders (the frozen base convolution is candle's).
        let x = Tensor::randn(0f64, 1.0, (2, 6, 7, 5), &Device::Cpu).unwrap();
        check_gradients(&with_adapter(conv2d(1, 2), 3), &x);
        let x = Var::randn(0f64, 1.0, (2, 3, 9), &Device::Cpu).unwrap();
        check_gradients(&with_adapter(conv1d(), 2), x.as_tensor());
    }
}
