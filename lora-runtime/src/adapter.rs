//! [`Adapter`]: one trainable low-rank update (`A`, `B` and their scaling, and for DoRA a
//! magnitude vector), and [`AdapterSet`]: the named adapters a layer holds, as PEFT keeps them (a
//! map by name plus the active name).
//!
//! Both sit below every layer kind: a layer owns an `AdapterSet` and says how its factors are
//! shaped; everything about names, activation and initialisation lives here once.
//!
//! ```
//! use candle_core::{DType, Device};
//! use lora_runtime::{Adapter, AdapterSet, LayerConfig, DEFAULT_ADAPTER};
//!
//! let ad = Adapter::fresh(16, 32, &LayerConfig::new(4, 8.0), 0, DType::F32, &Device::Cpu)?;
//! assert_eq!((ad.a().dims(), ad.b().dims()), (&[4, 16][..], &[32, 4][..]));
//! assert_eq!(ad.scaling(), 2.0);
//!
//! let mut set = AdapterSet::default();
//! assert_eq!(set.active_name(), Some(DEFAULT_ADAPTER));
//! set.insert("other", ad);
//! assert!(set.active().is_none()); // `default` is active but absent: the base alone
//! set.set_active(Some("other"));
//! assert_eq!(set.active().map(Adapter::rank), Some(4));
//! # Ok::<(), lora_runtime::LayerError>(())
//! ```

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::{adalora_scaling, scaling, AdaLoraSchedule, LayerConfig, LoraInit};
use crate::error::{Factor, LayerError, LayerResult};
use crate::layout::FactorLayout;

/// The name of the adapter that `init_adapter` and `load_adapter` create, as in PEFT.
pub const DEFAULT_ADAPTER: &str = "default";

/// A trainable low-rank adapter: `A [r, in]`, `B [out, r]` and the scaling of `B A`; for DoRA
/// also a magnitude `m [out]`; for AdaLoRA also singular values `E [r, 1]`.
///
/// DoRA (Liu et al. 2024, PEFT's `use_dora`) decomposes the adapted weight into a direction and a
/// magnitude: `W' = (m / ||W + s B A||) * (W + s B A)`, row by row (one norm per output feature).
/// The magnitude lives here, beside the factors it rescales, and trains with them; the norm
/// needs the base weight, so the layer computes it (see
/// [`LoraLayer::dora_weight_norm`](crate::LoraLayer::dora_weight_norm)).
///
/// AdaLoRA (Zhang et al. 2023, PEFT's `AdaLoraConfig`) writes the update as an SVD-like triplet
/// `B diag(E) A` whose singular values `E [r, 1]` a rank allocator prunes during training: the
/// layers use [`effective_a`](Self::effective_a), `A * E` (row `i` of `A` times `E[i]`), in
/// place of `A`, and the scaling is PEFT's `alpha / (ranknum + 1e-5)`, where `ranknum` is the
/// rank the adapter started with (PEFT's `init_r`, kept when pruned singular values are dropped).
#[derive(Debug, Clone)]
pub struct Adapter {
    a: Var,
    b: Var,
    /// DoRA's `lora_magnitude_vector`, `[out]`; `None` for a plain LoRA adapter.
    magnitude: Option<Var>,
    /// AdaLoRA's singular values and `ranknum`; `None` for a LoRA adapter.
    adalora: Option<AdaLoraParts>,
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    dropout: f32,
    /// How it was initialised (PEFT's `init_lora_weights`, which files record).
    init: LoraInit,
}

impl Adapter {
    /// Builds an adapter from its factors.
    ///
    /// # Errors
    /// [`LayerError::FactorShape`] when `A` and `B` are not matrices or their ranks disagree,
    /// [`LayerError::InvalidConfig`] for a rank of 0, a non-positive alpha or a dropout outside
    /// `[0, 1)`.
    pub fn new(a: Var, b: Var, alpha: f64, use_rslora: bool, dropout: f32) -> LayerResult<Self> {
        // Matrices for linear and embedding layers; convolutions add kernel dimensions
        // (`A [r, in, k...]`, `B [out, r, 1...]`, see `FactorLayout`).
        let (&[r, _, ..], true) = (a.dims(), a.rank() <= 5) else {
            return Err(LayerError::FactorShape {
                factor: Factor::A,
                found: a.dims().to_vec(),
                expected: "a matrix [r, in] (or a kernel [r, in, k...])".into(),
            });
        };
        let rank_of_b = match *b.dims() {
            [_, rb, ..] if b.rank() == a.rank() => Some(rb),
            _ => None,
        };
        if rank_of_b != Some(r) {
            return Err(LayerError::FactorShape {
                factor: Factor::B,
                found: b.dims().to_vec(),
                expected: format!(
                    "[out, {r}] with as many dimensions as lora_A {:?} (the rank of lora_A)",
                    a.dims()
                ),
            });
        }
        LayerConfig::new(r, alpha).with_dropout(dropout).check()?;
        Ok(Self {
            a,
            b,
            magnitude: None,
            adalora: None,
            rank: r,
            alpha,
            use_rslora,
            dropout,
            init: LoraInit::Kaiming,
        })
    }

    /// Records how the adapter was initialised (saved as PEFT's `init_lora_weights`; for PiSSA
    /// and OLoRA it tells PEFT that the adapter belongs to a residual base).
    #[must_use]
    pub fn with_init(mut self, init: LoraInit) -> Self {
        self.init = init;
        self
    }

    /// How the adapter was initialised (see [`with_init`](Self::with_init)).
    pub fn init(&self) -> LoraInit {
        self.init
    }

    /// Makes this a DoRA adapter with the magnitude `m [out]` (PEFT's `lora_magnitude_vector`).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use lora_runtime::{Adapter, LayerConfig};
    ///
    /// let ad = Adapter::fresh(16, 32, &LayerConfig::new(4, 8.0), 0, DType::F32, &Device::Cpu)?;
    /// let m = Var::from_tensor(&Tensor::ones(32, DType::F32, &Device::Cpu)?)?;
    /// let dora = ad.with_magnitude(m)?;
    /// assert!(dora.is_dora());
    /// assert_eq!(dora.num_parameters(), 4 * (16 + 32) + 32);
    /// # Ok::<(), lora_runtime::LayerError>(())
    /// ```
    ///
    /// # Errors
    /// [`LayerError::FactorShape`] when `m` is not a vector as long as `B` is high.
    pub fn with_magnitude(mut self, magnitude: Var) -> LayerResult<Self> {
        let out = self.b.dims().first().copied().unwrap_or(0);
        if magnitude.dims() != [out] {
            return Err(LayerError::FactorShape {
                factor: Factor::Magnitude,
                found: magnitude.dims().to_vec(),
                expected: format!("[{out}] (the height of lora_B)"),
            });
        }
        self.magnitude = Some(magnitude);
        Ok(self)
    }

    /// Makes this an AdaLoRA adapter with singular values `E [r, 1]` (PEFT's `lora_E`), the
    /// `ranknum` its scaling divides by (PEFT's `init_r`: the rank before any singular value
    /// was dropped) and the training schedule it was made with (saved in its config).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor, Var};
    /// use lora_runtime::{AdaLoraSchedule, Adapter, LayerConfig};
    ///
    /// let ad = Adapter::fresh(16, 32, &LayerConfig::new(4, 8.0), 0, DType::F32, &Device::Cpu)?;
    /// let e = Var::from_tensor(&Tensor::ones((4, 1), DType::F32, &Device::Cpu)?)?;
    /// let ada = ad.with_adalora(e, 6, AdaLoraSchedule::default())?;
    /// assert_eq!((ada.is_adalora(), ada.ranknum()), (true, Some(6)));
    /// assert_eq!(ada.scaling(), 8.0 / (6.0 + 1e-5));
    /// assert_eq!(ada.num_parameters(), 4 * (16 + 32) + 4);
    /// # Ok::<(), lora_runtime::LayerError>(())
    /// ```
    ///
    /// # Errors
    /// [`LayerError::FactorShape`] when `E` is not `[r, 1]` or `A` and `B` are not matrices;
    /// [`LayerError::InvalidConfig`] for a DoRA adapter, rsLoRA or a `ranknum` of 0.
    pub fn with_adalora(
        mut self,
        e: Var,
        ranknum: usize,
        schedule: AdaLoraSchedule,
    ) -> LayerResult<Self> {
        if self.is_dora() {
            return Err(LayerError::InvalidConfig {
                field: "use_dora".into(),
                reason: "DoRA with AdaLoRA is not supported (nor in PEFT)".into(),
            });
        }
        if self.use_rslora {
            return Err(LayerError::InvalidConfig {
                field: "use_rslora".into(),
                reason: "AdaLoRA scales by `alpha / (ranknum + 1e-5)`: rsLoRA does not apply"
                    .into(),
            });
        }
        if ranknum == 0 {
            return Err(LayerError::InvalidConfig {
                field: "init_r".into(),
                reason: "AdaLoRA's ranknum must be at least 1".into(),
            });
        }
        if self.a.rank() != 2 {
            return Err(LayerError::FactorShape {
                factor: Factor::A,
                found: self.a.dims().to_vec(),
                expected: "a matrix [r, in] (AdaLoRA is for linear layers)".into(),
            });
        }
        if e.dims() != [self.rank, 1] {
            return Err(LayerError::FactorShape {
                factor: Factor::E,
                found: e.dims().to_vec(),
                expected: format!("[{}, 1] (the rank of lora_A)", self.rank),
            });
        }
        self.adalora = Some(AdaLoraParts {
            e,
            ranknum,
            schedule,
            kept: None,
        });
        Ok(self)
    }

    /// The AdaLoRA adapter with only the singular values `keep` marks (rows of `A` and `E`,
    /// columns of `B`), as PEFT's `resize_state_dict_by_rank_pattern` saves it: `ranknum` stays,
    /// so the output is unchanged when the dropped singular values are 0, and `keep` is recorded
    /// as this module's `rank_pattern` entry for the file. New variables: the result does not
    /// share storage with `self`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use lora_runtime::{AdaLoraSchedule, Adapter, LayerConfig};
    ///
    /// let cfg = LayerConfig::new(3, 6.0).with_adalora(Some(AdaLoraSchedule::default()));
    /// let ad = Adapter::fresh(5, 4, &cfg, 0, DType::F32, &Device::Cpu)?;
    /// let pruned = ad.pruned_to(&[true, false, true])?;
    /// assert_eq!((pruned.rank(), pruned.ranknum()), (2, Some(3)));
    /// assert_eq!(pruned.adalora_kept(), Some(&[true, false, true][..]));
    /// # Ok::<(), lora_runtime::LayerError>(())
    /// ```
    ///
    /// # Errors
    /// [`LayerError::InvalidConfig`] for a LoRA adapter, a mask whose length is not the rank or
    /// that keeps nothing; candle errors.
    pub fn pruned_to(&self, keep: &[bool]) -> LayerResult<Self> {
        let invalid = |reason: String| LayerError::InvalidConfig {
            field: "rank_pattern".into(),
            reason,
        };
        let Some(parts) = &self.adalora else {
            return Err(invalid(
                "only AdaLoRA adapters have singular values to prune".into(),
            ));
        };
        if keep.len() != self.rank || !keep.contains(&true) {
            return Err(invalid(format!(
                "a mask of {} singular values with at least one kept is needed, got {keep:?}",
                self.rank
            )));
        }
        let rows: Vec<u32> = (0..keep.len())
            .filter(|&i| keep[i])
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        let idx = Tensor::new(rows.as_slice(), self.a.device())?;
        let pick = |v: &Var, dim: usize| -> LayerResult<Var> {
            Ok(Var::from_tensor(
                &v.as_tensor().index_select(&idx, dim)?.contiguous()?,
            )?)
        };
        let mut pruned = Adapter::new(
            pick(&self.a, 0)?,
            pick(&self.b, 1)?,
            self.alpha,
            self.use_rslora,
            self.dropout,
        )?
        .with_init(self.init)
        .with_adalora(pick(&parts.e, 0)?, parts.ranknum, parts.schedule)?;
        if let Some(p) = pruned.adalora.as_mut() {
            p.kept = Some(keep.to_vec());
        }
        Ok(pruned)
    }

    /// Which of the `ranknum` singular values an adapter made by [`pruned_to`](Self::pruned_to)
    /// kept (its `rank_pattern` entry); `None` otherwise.
    pub fn adalora_kept(&self) -> Option<&[bool]> {
        self.adalora.as_ref().and_then(|p| p.kept.as_deref())
    }

    /// A fresh adapter for a layer `[out, in]`: `A` random as `config.init` says (from a
    /// generator seeded with `seed`), `B = 0`, so it does not change the layer's output yet.
    /// `config.use_dora` is not looked at here: the magnitude needs the base weight, which the
    /// layer has (see [`LoraLayer::fresh_adapter`](crate::LoraLayer::fresh_adapter)).
    ///
    /// # Errors
    /// [`LayerError::InvalidConfig`] for invalid hyper-parameters.
    pub fn fresh(
        inp: usize,
        out: usize,
        config: &LayerConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> LayerResult<Self> {
        let layout = FactorLayout::matrix(inp, out, config.rank);
        Self::fresh_for(&layout, config, seed, dtype, device)
    }

    /// [`fresh`](Self::fresh) for factors of any [`FactorLayout`] (whose rank must be
    /// `config.rank`): `A` random with the fan-in of its layout, `B = 0`. With
    /// `config.adalora`, an AdaLoRA adapter initialised as PEFT's `reset_lora_parameters`:
    /// `E = 0`, `A` and `B ~ N(0, 0.02)`, `ranknum = r` (a no-op, since `E = 0`).
    ///
    /// # Errors
    /// [`LayerError::InvalidConfig`] for invalid hyper-parameters or a layout of another rank.
    pub fn fresh_for(
        layout: &FactorLayout,
        config: &LayerConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> LayerResult<Self> {
        config.check()?;
        let r = config.rank;
        if layout.rank() != r {
            return Err(LayerError::InvalidConfig {
                field: "r".into(),
                reason: format!("the factor layout has rank {}, not {r}", layout.rank()),
            });
        }
        let fan_in = layout.fan_in();
        let mut rng = StdRng::seed_from_u64(seed);
        if let Some(schedule) = config.adalora {
            return Self::fresh_adalora(layout, config, schedule, &mut rng, dtype, device);
        }
        let values: Vec<f32> = match config.init {
            LoraInit::Kaiming => {
                // kaiming_uniform(a = sqrt(5)) on a [r, in, k...] weight: bound = 1 / sqrt(fan_in).
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..r * fan_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
            LoraInit::Gaussian => {
                let normal =
                    Normal::new(0.0f32, 1.0 / r as f32).map_err(|e| LayerError::InvalidConfig {
                        field: "init".into(),
                        reason: format!("gaussian init: {e}"),
                    })?;
                (0..r * fan_in).map(|_| normal.sample(&mut rng)).collect()
            }
            LoraInit::Pissa { .. } | LoraInit::Olora => {
                return Err(LayerError::InvalidConfig {
                    field: "init".into(),
                    reason: "PiSSA and OLoRA take the adapter out of a layer's weight: \
                             `init_adapter` does it on linear layers (`LoraLayer::fresh_decomposed`)"
                        .into(),
                })
            }
        };
        let a = Tensor::from_vec(values, layout.a(), device)?.to_dtype(dtype)?;
        let b = Tensor::zeros(layout.b(), dtype, device)?;
        Ok(Self::new(
            Var::from_tensor(&a)?,
            Var::from_tensor(&b)?,
            config.alpha,
            config.use_rslora,
            config.dropout,
        )?
        .with_init(config.init))
    }

    /// The AdaLoRA part of [`fresh_for`](Self::fresh_for).
    fn fresh_adalora(
        layout: &FactorLayout,
        config: &LayerConfig,
        schedule: AdaLoraSchedule,
        rng: &mut StdRng,
        dtype: DType,
        device: &Device,
    ) -> LayerResult<Self> {
        if config.use_dora || config.use_rslora || config.init.decomposition().is_some() {
            return Err(LayerError::InvalidConfig {
                field: "adalora".into(),
                reason: "AdaLoRA takes neither DoRA, rsLoRA nor PiSSA / OLoRA initialisation"
                    .into(),
            });
        }
        let r = config.rank;
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| LayerError::InvalidConfig {
            field: "init".into(),
            reason: format!("AdaLoRA init: {e}"),
        })?;
        let mut draw = |shape: &[usize]| -> LayerResult<Var> {
            let n = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&t)?)
        };
        let a = draw(layout.a())?;
        let b = draw(layout.b())?;
        let e = Var::from_tensor(&Tensor::zeros((r, 1), dtype, device)?)?;
        Self::new(a, b, config.alpha, false, config.dropout)?
            .with_init(config.init)
            .with_adalora(e, r, schedule)
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
        self.rank
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
    /// The factor applied to `B A` (to `B (A * E)` for AdaLoRA: `alpha / (ranknum + 1e-5)`).
    pub fn scaling(&self) -> f64 {
        match &self.adalora {
            Some(parts) => adalora_scaling(self.rank, self.alpha, parts.ranknum),
            None => scaling(self.rank, self.alpha, self.use_rslora),
        }
    }
    /// AdaLoRA's singular values `E [r, 1]`, for an AdaLoRA adapter.
    pub fn e(&self) -> Option<&Var> {
        self.adalora.as_ref().map(|p| &p.e)
    }
    /// AdaLoRA's `ranknum` (the rank the adapter started with), for an AdaLoRA adapter.
    pub fn ranknum(&self) -> Option<usize> {
        self.adalora.as_ref().map(|p| p.ranknum)
    }
    /// AdaLoRA's training schedule, for an AdaLoRA adapter.
    pub fn adalora_schedule(&self) -> Option<&AdaLoraSchedule> {
        self.adalora.as_ref().map(|p| &p.schedule)
    }
    /// Whether this is an AdaLoRA adapter (it has singular values `E`).
    pub fn is_adalora(&self) -> bool {
        self.adalora.is_some()
    }
    /// `A` as the layers use it: `A * E` (each row times its singular value) for AdaLoRA, `A`
    /// itself otherwise. Attached: a loss on the result gives gradients to `A` and `E`.
    ///
    /// # Errors
    /// A candle error.
    pub fn effective_a(&self) -> candle_core::Result<Tensor> {
        match &self.adalora {
            Some(parts) => self.a.as_tensor().broadcast_mul(parts.e.as_tensor()),
            None => Ok(self.a.as_tensor().clone()),
        }
    }
    /// DoRA's magnitude `m [out]`, for a DoRA adapter.
    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref()
    }
    /// Whether this is a DoRA adapter (it has a magnitude).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }
    /// Number of trainable parameters: `r * (in + out)`, plus `out` for DoRA, plus `r` for
    /// AdaLoRA.
    pub fn num_parameters(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, |m| m.elem_count())
            + self.adalora.as_ref().map_or(0, |p| p.e.elem_count())
    }
    /// The trainable variables: `A`, `B` and, for DoRA, the magnitude, for AdaLoRA `E`, with
    /// which each is.
    pub fn vars(&self) -> Vec<(Factor, &Var)> {
        let mut vars = vec![(Factor::A, &self.a), (Factor::B, &self.b)];
        if let Some(m) = &self.magnitude {
            vars.push((Factor::Magnitude, m));
        }
        if let Some(parts) = &self.adalora {
            vars.push((Factor::E, &parts.e));
        }
        vars
    }

    /// `s * B A` in f32, `[out, in]` (AdaLoRA: `s * B (A * E)`), detached: no gradient flows
    /// through it. Convolution factors are flattened first (`B [out, r]`, `A [r, in * k...]`):
    /// the layer reshapes the result to its kernel.
    ///
    /// # Errors
    /// A candle error.
    pub fn delta(&self) -> LayerResult<Tensor> {
        let a = self
            .effective_a()?
            .detach()
            .to_dtype(DType::F32)?
            .flatten_from(1)?;
        // Scale the small factor B rather than the [out, in] product: one pass fewer.
        let b = self
            .b
            .as_tensor()
            .detach()
            .to_dtype(DType::F32)?
            .flatten_from(1)?
            .affine(self.scaling(), 0.0)?;
        Ok(b.matmul(&a)?)
    }
}

/// AdaLoRA's additions to an adapter.
#[derive(Debug, Clone)]
struct AdaLoraParts {
    /// `lora_E`, `[r, 1]`.
    e: Var,
    /// PEFT's `ranknum`: the scaling divides by it.
    ranknum: usize,
    /// The hyper-parameters it trains with (written to its config on save).
    schedule: AdaLoraSchedule,
    /// The singular values of the `ranknum` that [`Adapter::pruned_to`] kept.
    kept: Option<Vec<bool>>,
}

/// The adapters of one layer by name, and which one is active.
///
/// The active name may name no adapter of this layer (a model where only some layers have it):
/// then the layer runs its base alone. New sets have [`DEFAULT_ADAPTER`] active, as PEFT does.
#[derive(Debug, Clone)]
pub struct AdapterSet {
    by_name: BTreeMap<String, Adapter>,
    active: Option<String>,
}

impl Default for AdapterSet {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            active: Some(DEFAULT_ADAPTER.to_string()),
        }
    }
}

impl AdapterSet {
    /// The active adapter, if the layer has one of the active name.
    pub fn active(&self) -> Option<&Adapter> {
        self.active.as_deref().and_then(|n| self.by_name.get(n))
    }
    /// The active name (`None`: the base alone).
    pub fn active_name(&self) -> Option<&str> {
        self.active.as_deref()
    }
    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&Adapter> {
        self.by_name.get(name)
    }
    /// The names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
    /// `(name, adapter)` pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Adapter)> {
        self.by_name.iter().map(|(n, a)| (n.as_str(), a))
    }
    /// Whether the set holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// Adds or replaces the adapter `name`. The layer checks the factors' shapes first.
    pub fn insert(&mut self, name: &str, adapter: Adapter) {
        self.by_name.insert(name.to_string(), adapter);
    }
    /// Removes the adapter `name`, returning it.
    pub fn remove(&mut self, name: &str) -> Option<Adapter> {
        self.by_name.remove(name)
    }
    /// Makes `name` active (`None`: the base alone).
    pub fn set_active(&mut self, name: Option<&str>) {
        self.active = name.map(str::to_string);
    }
    /// Removes every adapter (the active name stays).
    pub fn clear(&mut self) {
        self.by_name.clear();
    }
}
