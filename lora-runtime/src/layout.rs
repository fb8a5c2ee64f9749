//! [`FactorLayout`]: how a layer kind shapes and names its LoRA factors.
//!
//! A linear layer's factors are the matrices `A [r, in]` and `B [out, r]`, stored by PEFT as
//! `lora_A.weight` / `lora_B.weight`. Other kinds differ only in these two respects: a
//! convolution's `A` is a convolution kernel `[r, in, k...]` and its `B` a 1x1 kernel
//! `[out, r, 1...]`; an embedding's factors are matrices stored as `lora_embedding_A` /
//! `lora_embedding_B`. Everything else (ranks, scaling, the merged delta `s B A` of the
//! factors flattened to matrices) is common, so a layer kind says its layout through
//! [`LoraLayer::factor_layout`](crate::LoraLayer::factor_layout) and the adapter, the checks and
//! the file format follow it.
//!
//! ```
//! use lora_runtime::layout::{FactorLayout, FactorNames};
//!
//! let linear = FactorLayout::matrix(16, 32, 4);
//! assert_eq!((linear.a(), linear.b()), (&[4, 16][..], &[32, 4][..]));
//! let conv = FactorLayout::conv(3, 8, &[3, 3], 4);
//! assert_eq!((conv.a(), conv.b()), (&[4, 3, 3, 3][..], &[8, 4, 1, 1][..]));
//! assert_eq!(conv.fan_in(), 27);
//! let embedding = FactorLayout::matrix(100, 16, 4).with_names(FactorNames::Embedding);
//! assert_eq!(embedding.names().factor_name(lora_runtime::Factor::A), "lora_embedding_A");
//! ```

use crate::error::{Factor, LayerError, LayerResult};

/// PEFT's names for a layer's factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FactorNames {
    /// `lora_A.weight` / `lora_B.weight` (linear and convolution layers: the factors are
    /// modules in PEFT).
    #[default]
    Lora,
    /// `lora_embedding_A` / `lora_embedding_B`, without `.weight` (embedding layers: the
    /// factors are bare parameters in PEFT).
    Embedding,
    /// `lora_A` / `lora_E` / `lora_B`, without `.weight` (AdaLoRA's linear layers: the factors
    /// are bare parameters in PEFT).
    AdaLora,
}

impl FactorNames {
    /// Every (naming, factor) pair a PEFT key can hold, in the order [`parse`](Self::parse)
    /// tries them.
    /// `lora_A` and `lora_B` parse as [`Lora`](Self::Lora): the key's suffix tells AdaLoRA's
    /// bare parameters apart (see `peft::keys`).
    const ALL: [(Self, Factor); 6] = [
        (Self::Lora, Factor::A),
        (Self::Lora, Factor::B),
        (Self::Lora, Factor::Magnitude),
        (Self::Embedding, Factor::A),
        (Self::Embedding, Factor::B),
        (Self::AdaLora, Factor::E),
    ];

    /// The name of `factor`: `lora_A` or `lora_embedding_A`, ...; DoRA's magnitude is
    /// `lora_magnitude_vector` under every naming, AdaLoRA's singular values `lora_E`.
    pub fn factor_name(self, factor: Factor) -> &'static str {
        match (self, factor) {
            (_, Factor::Magnitude) => "lora_magnitude_vector",
            (_, Factor::E) => "lora_E",
            (Self::Lora | Self::AdaLora, Factor::A) => "lora_A",
            (Self::Lora | Self::AdaLora, Factor::B) => "lora_B",
            (Self::Embedding, Factor::A) => "lora_embedding_A",
            (Self::Embedding, Factor::B) => "lora_embedding_B",
        }
    }

    /// The factor and naming of a key segment (`lora_embedding_B` is `B` of an embedding), the
    /// inverse of [`factor_name`](Self::factor_name); `None` for any other segment.
    pub fn parse(segment: &str) -> Option<(Factor, Self)> {
        Self::ALL
            .into_iter()
            .find(|&(names, factor)| names.factor_name(factor) == segment)
            .map(|(names, factor)| (factor, names))
    }

    /// Whether PEFT's key of `factor` ends in `.weight` after the factor name (and the adapter
    /// name when `named`): linear and convolution factors always (they are modules in PEFT),
    /// embedding factors never (bare parameters), DoRA's magnitude only with an adapter name
    /// (PEFT 0.21 files store it as `...lora_magnitude_vector`), AdaLoRA's factors never.
    pub fn has_weight_suffix(self, factor: Factor, named: bool) -> bool {
        match (self, factor) {
            (_, Factor::Magnitude) => named,
            (Self::Lora, _) => true,
            (Self::Embedding | Self::AdaLora, _) => false,
        }
    }
}

/// The shapes of `A` and `B` for one rank, and PEFT's names for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorLayout {
    a: Vec<usize>,
    b: Vec<usize>,
    names: FactorNames,
}

impl FactorLayout {
    /// A linear layer's layout: `A [r, in]`, `B [out, r]`.
    pub fn matrix(inp: usize, out: usize, rank: usize) -> Self {
        Self {
            a: vec![rank, inp],
            b: vec![out, rank],
            names: FactorNames::Lora,
        }
    }

    /// A convolution's layout as PEFT builds it: `A [r, in, k...]` (a convolution with the
    /// layer's kernel), `B [out, r, 1...]` (a 1x1 convolution).
    pub fn conv(inp: usize, out: usize, kernel: &[usize], rank: usize) -> Self {
        let mut a = vec![rank, inp];
        a.extend_from_slice(kernel);
        let mut b = vec![out, rank];
        b.extend(kernel.iter().map(|_| 1));
        Self {
            a,
            b,
            names: FactorNames::Lora,
        }
    }

    /// The same shapes under other names.
    pub fn with_names(mut self, names: FactorNames) -> Self {
        self.names = names;
        self
    }

    /// The shape of `A`.
    pub fn a(&self) -> &[usize] {
        &self.a
    }
    /// The shape of `B`.
    pub fn b(&self) -> &[usize] {
        &self.b
    }
    /// PEFT's names for the factors.
    pub fn names(&self) -> FactorNames {
        self.names
    }
    /// The rank `r` (the first dimension of `A`).
    pub fn rank(&self) -> usize {
        self.a.first().copied().unwrap_or(0)
    }
    /// The fan-in of `A` as PyTorch computes it for initialisation: the product of its
    /// dimensions after the first (`in`, or `in * k...` for a convolution).
    pub fn fan_in(&self) -> usize {
        self.a.iter().skip(1).product()
    }

    /// Checks factors of shapes `a` and `b` against this layout (whose rank is taken from `a`).
    ///
    /// # Errors
    /// [`LayerError::FactorShape`] naming the factor that does not fit.
    pub fn check(&self, a: &[usize], b: &[usize]) -> LayerResult<()> {
        let r = a.first().copied().unwrap_or(0);
        let a_fits = r > 0 && a.len() == self.a.len() && a[1..] == self.a[1..];
        if !a_fits {
            let rest: Vec<String> = self.a.iter().skip(1).map(usize::to_string).collect();
            return Err(LayerError::FactorShape {
                factor: Factor::A,
                found: a.to_vec(),
                expected: format!("[r, {}]", rest.join(", ")),
            });
        }
        let mut expected_b = self.b.clone();
        if let Some(rb) = expected_b.get_mut(1) {
            *rb = r;
        }
        if b != expected_b {
            return Err(LayerError::FactorShape {
                factor: Factor::B,
                found: b.to_vec(),
                expected: format!("{expected_b:?}"),
            });
        }
        Ok(())
    }
}
