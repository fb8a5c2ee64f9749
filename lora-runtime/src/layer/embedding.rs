//! [`LoraEmbedding`]: a frozen embedding table plus named LoRA adapters, as PEFT's
//! `lora.Embedding`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_nn::{Embedding, Module, VarMap};
//! use lora_runtime::{LoraEmbedding, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let base = Embedding::new(Tensor::randn(0f32, 1., (100, 16), &dev)?, 16);
//! let ids = Tensor::new(&[[1u32, 5, 7], [0, 99, 5]], &dev)?;
//! let y_base = base.forward(&ids)?;
//!
//! let mut layer = LoraEmbedding::from(base);
//! layer.init_adapter(&VarMap::new())?;
//! // As in PEFT, A starts at zero (and B random): a fresh adapter does not change the output.
//! assert_eq!(layer.forward(&ids)?.to_vec3::<f32>()?, y_base.to_vec3::<f32>()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;

use candle_core::{DType, Device, Module, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::adapter::{Adapter, AdapterSet};
use crate::config::LayerConfig;
use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::layer::weight::BaseWeight;
use crate::layer::{LoraLayer, MergedWeight};
use crate::layout::{FactorLayout, FactorNames};
use crate::routing::Routing;

/// An embedding layer with a frozen table and named LoRA adapters, in PEFT's layout:
/// `lora_embedding_A [r, num_embeddings]`, `lora_embedding_B [embedding_dim, r]`.
///
/// The forward pass is `W[x] + s * (A^T[x]) B^T`: the rows of `A^T` picked by the ids, times
/// `B^T`; `B A` is never formed. The merged weight is `W + s (B A)^T`. As in PEFT, the LoRA
/// branch of an embedding has no dropout (PEFT's `lora.Embedding` ignores `lora_dropout`), and
/// fresh adapters have `A = 0` and `B` drawn from a standard normal.
///
/// Built from a [`candle_nn::Embedding`] with `.into()`; without an adapter its output is
/// bit-identical to the base layer's. The table is a detached plain tensor: no gradient flows
/// into it.
#[derive(Debug, Clone)]
pub struct LoraEmbedding {
    /// The table `[num_embeddings, embedding_dim]`; merged while merged.
    weight: BaseWeight,
    /// `(num_embeddings, embedding_dim)`.
    shape: (usize, usize),
    adapters: AdapterSet,
    /// Training mode: merged layers refused.
    training: bool,
}

impl From<candle_nn::Embedding> for LoraEmbedding {
    /// Freezes a candle embedding layer.
    fn from(embedding: candle_nn::Embedding) -> Self {
        Self::build(embedding.embeddings().detach())
    }
}

impl LoraEmbedding {
    /// A layer without adapter from a table `[num_embeddings, embedding_dim]`, detached from
    /// any gradient graph.
    ///
    /// # Errors
    /// When the table is not a matrix.
    pub fn new(weight: Tensor) -> candle_core::Result<Self> {
        weight.dims2()?;
        Ok(Self::build(weight.detach()))
    }

    fn build(weight: Tensor) -> Self {
        // A matrix from `new`; candle's `Embedding` does not check, so another rank is read as
        // `[rows, last dim]`, which every operation then rejects as a shape error.
        let shape = match *weight.dims() {
            [n, d] => (n, d),
            _ => {
                let d = weight.dims().last().copied().unwrap_or(1).max(1);
                (weight.elem_count() / d, d)
            }
        };
        Self {
            weight: BaseWeight::new(weight),
            shape,
            adapters: AdapterSet::default(),
            training: false,
        }
    }

    /// The table `[num_embeddings, embedding_dim]`; merged when merged.
    pub fn weight(&self) -> &Tensor {
        self.weight.current()
    }
    /// The number of embeddings (rows of the table; the width of `A`).
    pub fn num_embeddings(&self) -> usize {
        self.shape.0
    }
    /// The embedding dimension (columns of the table; the height of `B`).
    pub fn embedding_dim(&self) -> usize {
        self.shape.1
    }
    /// The active adapter, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapters.active()
    }
    /// Whether an adapter is folded into the table.
    pub fn is_merged(&self) -> bool {
        self.weight.is_merged()
    }
    /// Whether the layer is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }
    /// Switches training mode (in which a merged layer is refused). Layers start in inference
    /// mode.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }
    /// The table without the adapter: [`weight`](Self::weight), or while merged the table from
    /// before the merge.
    pub fn base_weight(&self) -> &Tensor {
        self.weight.original()
    }

    /// `s * (B A)^T` of the active adapter in f32, `[num_embeddings, embedding_dim]` like the
    /// table (PEFT's `get_delta_weight`). Detached.
    ///
    /// # Errors
    /// [`LayerError::NoAdapter`] when the layer has no active adapter.
    pub fn delta_weight(&self) -> LayerResult<Tensor> {
        let delta = self.adapter().ok_or(LayerError::NoAdapter)?.delta()?;
        Ok(delta.t()?)
    }

    /// The LoRA branch `s * (A^T[ids]) B^T`, `[..ids, embedding_dim]`, in the factors' dtype.
    fn lora_term(&self, ad: &Adapter, ids: &Tensor) -> candle_core::Result<Tensor> {
        let flat = ids.flatten_all()?;
        // The columns of A [r, num] picked by the ids: [r, n], then [n, r].
        let h = ad.a().as_tensor().index_select(&flat, 1)?.t()?;
        let y = h
            .matmul(&ad.b().as_tensor().t()?)?
            .affine(ad.scaling(), 0.0)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.shape.1);
        y.reshape(dims)
    }

    /// `W[ids] + s * (A^T[ids]) B^T` with the active adapter. `train` only matters for a merged
    /// layer, which cannot train (no gradient would reach `A` and `B`): the embedding's LoRA
    /// branch has no dropout.
    ///
    /// # Errors
    /// Shape and index errors from candle; training a merged layer.
    pub fn forward_t(&self, ids: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let base =
            candle_nn::Embedding::new(self.weight.current().clone(), self.shape.1).forward(ids)?;
        let Some(ad) = self.adapter() else {
            return Ok(base);
        };
        if self.is_merged() {
            if train {
                return Err(candle_core::Error::msg(
                    "LoraEmbedding: cannot train a merged layer, call `unmerge()` first",
                ));
            }
            return Ok(base);
        }
        let term = self.lora_term(ad, ids)?.to_dtype(base.dtype())?;
        base + term
    }
}

impl LoraLayer for LoraEmbedding {
    fn in_features(&self) -> usize {
        self.shape.0
    }
    fn out_features(&self) -> usize {
        self.shape.1
    }
    /// The table's dtype, except f32 factors for f16 and bf16 tables (as `LoraLinear`).
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
        self.weight.current().elem_count()
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
        LoraEmbedding::is_merged(self)
    }

    /// PEFT's names, `lora_embedding_A [r, num_embeddings]` and
    /// `lora_embedding_B [embedding_dim, r]`.
    fn factor_layout(&self, rank: usize) -> FactorLayout {
        FactorLayout::matrix(self.shape.0, self.shape.1, rank).with_names(FactorNames::Embedding)
    }

    /// PEFT's initialisation for embeddings (`reset_lora_parameters`): `A = 0` and `B` from a
    /// standard normal, whatever `config.init` says (PEFT ignores it for embeddings too).
    fn fresh_adapter(&self, config: &LayerConfig, seed: u64) -> LayerResult<Adapter> {
        config.check()?;
        if config.use_dora {
            return Err(LayerError::dora_unsupported());
        }
        if config.adalora.is_some() {
            return Err(LayerError::adalora_unsupported());
        }
        let layout = self.factor_layout(config.rank);
        let (dtype, device) = (self.adapter_dtype(), self.device());
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = layout.b().iter().product();
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let a = Tensor::zeros(layout.a(), dtype, device)?;
        let b = Tensor::from_vec(values, layout.b(), device)?.to_dtype(dtype)?;
        Adapter::new(
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            config.alpha,
            config.use_rslora,
            config.dropout,
        )
    }

    /// `W + s (B A)^T`, computed in f32 and cast to the table's dtype.
    fn prepare_merge(&self) -> LayerResult<MergedWeight> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
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

    /// Embeddings take no mixed-adapter batches: nothing to route.
    fn set_routing(&mut self, _routing: Option<Routing>) {}

    fn prepare_routing(&self, _rows: &[Option<&str>]) -> LayerResult<Routing> {
        Err(LayerError::Refused(
            "mixed-adapter batches are not supported on embedding layers".into(),
        ))
    }

    fn is_training(&self) -> bool {
        LoraEmbedding::is_training(self)
    }
    fn set_training(&mut self, training: bool) {
        LoraEmbedding::set_training(self, training);
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Module for LoraEmbedding {
    /// The forward pass in the layer's mode (see [`LoraEmbedding::forward_t`]).
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(ids, self.training)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::DEFAULT_ADAPTER;

    fn layer() -> LoraEmbedding {
        let dev = Device::Cpu;
        let mut l = LoraEmbedding::new(Tensor::randn(0f64, 1.0, (7, 5), &dev).unwrap()).unwrap();
        let ad = l.fresh_adapter(&LayerConfig::new(3, 6.0), 1).unwrap();
        ad.a()
            .set(&Tensor::randn(0f64, 1.0, (3, 7), &dev).unwrap())
            .unwrap();
        l.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
        l
    }

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

    #[test]
    fn fresh_adapters_follow_peft_a_zero_b_normal() {
        let l =
            LoraEmbedding::new(Tensor::zeros((7, 5), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let ad = l.fresh_adapter(&LayerConfig::new(3, 6.0), 1).unwrap();
        assert_eq!((ad.a().dims(), ad.b().dims()), (&[3, 7][..], &[5, 3][..]));
        let a = ad.a().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().all(|v| *v == 0.0));
        let b = ad.b().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(b.iter().all(|v| *v != 0.0));
        assert_eq!(
            l.factor_layout(3).names().factor_name(crate::Factor::B),
            "lora_embedding_B"
        );
    }

    #[test]
    fn forward_is_the_merged_lookup_and_unmerge_is_exact() {
        let mut l = layer();
        let ad = l.adapter().unwrap().clone();
        let ids = Tensor::new(&[[0u32, 6, 2], [2, 2, 5]], &Device::Cpu).unwrap();
        let y = l.forward(&ids).unwrap();
        // Reference: the merged table W + s (B A)^T, looked up.
        let full = (l.weight()
            + ad.b()
                .matmul(ad.a())
                .unwrap()
                .t()
                .unwrap()
                .affine(ad.scaling(), 0.0)
                .unwrap())
        .unwrap();
        let reference = candle_nn::Embedding::new(full, 5).forward(&ids).unwrap();
        assert!(max_diff(&y, &reference) < 1e-12);
        let w0 = l.weight().clone();
        let merged = l.prepare_merge().unwrap();
        l.commit_merge(merged);
        // The merge computes the delta in f32 (as for every layer kind).
        assert!(max_diff(&l.forward(&ids).unwrap(), &reference) < 1e-5);
        assert!(l.forward_t(&ids, true).is_err(), "training a merged layer");
        l.revert_merge().unwrap();
        assert_eq!(
            l.weight().to_vec2::<f64>().unwrap(),
            w0.to_vec2::<f64>().unwrap()
        );
    }

    #[test]
    fn gradients_reach_a_and_b_and_match_finite_differences() {
        let l = layer();
        let ad = l.adapter().unwrap().clone();
        let ids = Tensor::new(&[[0u32, 6, 2], [2, 2, 5]], &Device::Cpu).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 5), &Device::Cpu).unwrap();
        let loss = |l: &LoraEmbedding| -> Tensor {
            (l.forward_t(&ids, true).unwrap() * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(&l).backward().unwrap();
        assert!(grads.get(l.weight()).is_none(), "the table is frozen");
        for var in [ad.a(), ad.b()] {
            let g = grads.get(var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let v0 = var.as_tensor().copy().unwrap();
            let flat = v0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in 0..flat.len() {
                let eps = 1e-6;
                let mut plus = flat.clone();
                plus[i] += eps;
                var.set(&Tensor::from_vec(plus, v0.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = loss(&l).to_scalar::<f64>().unwrap();
                let mut minus = flat.clone();
                minus[i] -= eps;
                var.set(&Tensor::from_vec(minus, v0.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = loss(&l).to_scalar::<f64>().unwrap();
                var.set(&v0).unwrap();
                let fd = (lp - lm) / (2.0 * eps);
                assert!((fd - g[i]).abs() < 1e-6, "{i}: {fd} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn factors_of_the_linear_layout_are_refused_with_the_expected_shape() {
        let l = layer();
        let err = l.check_factors(&[3, 5], &[5, 3]).unwrap_err();
        assert_eq!(err.to_string(), "lora_A has shape [3, 5], expected [r, 7]");
        let err = l.check_factors(&[3, 7], &[7, 3]).unwrap_err();
        assert_eq!(err.to_string(), "lora_B has shape [7, 3], expected [5, 3]");
    }
}
