//! [`BaseWeight`]: a layer's frozen weight and its merge state, written once for every layer
//! kind. It holds the weight in use (merged while merged), the original kept for a bit-exact
//! unmerge, and the original's fingerprint, computed once (the base is frozen) or given by a
//! loader whose file stores the weight otherwise (GGUF).
//!
//! The weight is a dense tensor for every kind; a linear layer's may also be quantized
//! ([`LinearWeight`]), which never merges.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::kernels;
use crate::layer::quantized::QuantizedWeight;
use crate::layer::MergedWeight;

/// What a frozen base weight must offer [`BaseWeight`].
pub(crate) trait Frozen: Clone + From<Tensor> {
    /// The weight as a dense tensor, or [`LayerError::Quantized`] saying `what` needed it.
    fn dense(&self, what: &str) -> LayerResult<&Tensor>;
    /// The fingerprint of the weight as held.
    fn hash(&self) -> LayerResult<BaseFingerprint>;
}

impl Frozen for Tensor {
    fn dense(&self, _what: &str) -> LayerResult<&Tensor> {
        Ok(self)
    }
    fn hash(&self) -> LayerResult<BaseFingerprint> {
        BaseFingerprint::of(self)
    }
}

/// A linear layer's weight: dense, or GGUF blocks (QLoRA).
#[derive(Debug, Clone)]
pub(crate) enum LinearWeight {
    /// A tensor in a float dtype.
    Dense(Tensor),
    /// Quantized blocks.
    Quantized(QuantizedWeight),
}

impl From<Tensor> for LinearWeight {
    fn from(t: Tensor) -> Self {
        Self::Dense(t)
    }
}

impl Frozen for LinearWeight {
    fn dense(&self, what: &str) -> LayerResult<&Tensor> {
        match self {
            Self::Dense(t) => Ok(t),
            Self::Quantized(_) => Err(LayerError::quantized(what)),
        }
    }
    fn hash(&self) -> LayerResult<BaseFingerprint> {
        match self {
            Self::Dense(t) => BaseFingerprint::of(t),
            Self::Quantized(q) => q.fingerprint(),
        }
    }
}

impl LinearWeight {
    /// The dtype computations with the weight run in: f32 for a quantized weight.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quantized(_) => DType::F32,
        }
    }
    /// The device the weight lives on.
    pub(crate) fn device(&self) -> &Device {
        match self {
            Self::Dense(t) => t.device(),
            Self::Quantized(q) => q.device(),
        }
    }
    /// The number of weights.
    pub(crate) fn elem_count(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count(),
            Self::Quantized(q) => q.dims().0 * q.dims().1,
        }
    }
}

/// What a merge asks of the weight (for [`LayerError::Quantized`]).
pub(crate) const MERGE: &str =
    "merging needs a dense weight: write a merged file with `lora merge` instead";

/// A frozen weight with its merge state (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct BaseWeight<W = Tensor> {
    /// The weight in use: merged while merged.
    current: W,
    /// While merged: the weight from before the merge.
    original: Option<W>,
    /// The fingerprint of the weight as its file stores it, when that is not the weight in
    /// memory (a GGUF tensor dequantized on load).
    stored: Option<BaseFingerprint>,
    /// The fingerprint of the original, once computed.
    cache: OnceLock<BaseFingerprint>,
}

impl<W: Frozen> BaseWeight<W> {
    pub(crate) fn new(weight: W) -> Self {
        Self {
            current: weight,
            original: None,
            stored: None,
            cache: OnceLock::new(),
        }
    }

    /// The weight in use (merged while merged).
    pub(crate) fn current(&self) -> &W {
        &self.current
    }

    /// The weight without any adapter: the original while merged.
    pub(crate) fn original(&self) -> &W {
        self.original.as_ref().unwrap_or(&self.current)
    }

    pub(crate) fn is_merged(&self) -> bool {
        self.original.is_some()
    }

    /// Records the fingerprint of the weight as its file stores it.
    pub(crate) fn set_stored_fingerprint(&mut self, fingerprint: BaseFingerprint) {
        self.stored = Some(fingerprint);
    }

    /// The stored fingerprint if given, else the original's hash (computed once).
    pub(crate) fn fingerprint(&self) -> LayerResult<BaseFingerprint> {
        if let Some(fp) = self.stored.as_ref().or(self.cache.get()) {
            return Ok(fp.clone());
        }
        let fp = self.original().hash()?;
        // Another thread may have set it meanwhile, to the same value.
        let _ = self.cache.set(fp.clone());
        Ok(fp)
    }

    /// `W + delta` in f32, cast back to the weight's dtype, checked to be finite: the general
    /// merge of every kind (`delta` in the stored layout).
    ///
    /// # Errors
    /// [`LayerError::Merged`], [`LayerError::Quantized`], [`LayerError::NonFinite`], candle
    /// errors.
    pub(crate) fn plus(&self, delta: &Tensor) -> LayerResult<MergedWeight> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        let current = self.current.dense(MERGE)?;
        let dtype = current.dtype();
        let merged = if dtype == DType::F32 {
            (current + delta)?
        } else {
            (current.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?
        };
        if !kernels::all_finite(&merged)? {
            return Err(LayerError::NonFinite);
        }
        Ok(MergedWeight(merged))
    }

    /// Installs a merged weight, keeping the original.
    pub(crate) fn commit(&mut self, merged: MergedWeight) {
        let original = std::mem::replace(&mut self.current, W::from(merged.0));
        self.original = Some(original);
    }

    /// Restores the original, bit for bit.
    ///
    /// # Errors
    /// [`LayerError::NotMerged`].
    pub(crate) fn revert(&mut self) -> LayerResult<()> {
        self.current = self.original.take().ok_or(LayerError::NotMerged)?;
        Ok(())
    }

    /// Makes the weight in use the base: the original is dropped, and the fingerprint is
    /// another (hashed afresh).
    pub(crate) fn unload(&mut self) {
        self.original = None;
        self.stored = None;
        self.cache = OnceLock::new();
    }

    /// Replaces the base (a PiSSA / OLoRA residual): another fingerprint, hashed afresh.
    pub(crate) fn replace(&mut self, weight: Tensor) {
        self.current = W::from(weight);
        self.original = None;
        self.stored = None;
        self.cache = OnceLock::new();
    }
}
