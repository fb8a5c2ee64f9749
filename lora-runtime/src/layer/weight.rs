//! [`BaseWeight`]: a layer's frozen weight and its merge state, written once for every layer
//! kind. It holds the weight in use (merged while merged), the original kept for a bit-exact
//! unmerge, and the original's fingerprint, computed once (the base is frozen) or given by a
//! loader whose file stores the weight otherwise (GGUF).

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use crate::error::{LayerError, LayerResult};
use crate::fingerprint::BaseFingerprint;
use crate::kernels;
use crate::layer::MergedWeight;

/// A frozen weight with its merge state (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct BaseWeight {
    /// The weight in use: merged while merged.
    current: Tensor,
    /// While merged: the weight from before the merge.
    original: Option<Tensor>,
    /// The fingerprint of the weight as its file stores it, when that is not the weight in
    /// memory (a GGUF tensor dequantized on load).
    stored: Option<BaseFingerprint>,
    /// The fingerprint of the original, once computed.
    cache: OnceLock<BaseFingerprint>,
}

impl BaseWeight {
    pub(crate) fn new(weight: Tensor) -> Self {
        Self {
            current: weight,
            original: None,
            stored: None,
            cache: OnceLock::new(),
        }
    }

    /// The weight in use (merged while merged).
    pub(crate) fn current(&self) -> &Tensor {
        &self.current
    }

    /// The weight without any adapter: the original while merged.
    pub(crate) fn original(&self) -> &Tensor {
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
        let fp = BaseFingerprint::of(self.original())?;
        // Another thread may have set it meanwhile, to the same value.
        let _ = self.cache.set(fp.clone());
        Ok(fp)
    }

    /// `W + delta` in f32, cast back to the weight's dtype, checked to be finite: the general
    /// merge of every kind (`delta` in the stored layout).
    ///
    /// # Errors
    /// [`LayerError::Merged`], [`LayerError::NonFinite`], candle errors.
    pub(crate) fn plus(&self, delta: &Tensor) -> LayerResult<MergedWeight> {
        if self.is_merged() {
            return Err(LayerError::Merged);
        }
        let dtype = self.current.dtype();
        let merged = if dtype == DType::F32 {
            (&self.current + delta)?
        } else {
            (self.current.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?
        };
        if !kernels::all_finite(&merged)? {
            return Err(LayerError::NonFinite);
        }
        Ok(MergedWeight(merged))
    }

    /// Installs a merged weight, keeping the original.
    pub(crate) fn commit(&mut self, merged: MergedWeight) {
        let original = std::mem::replace(&mut self.current, merged.0);
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
        self.current = weight;
        self.original = None;
        self.stored = None;
        self.cache = OnceLock::new();
    }
}
