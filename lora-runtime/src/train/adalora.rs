//! AdaLoRA's rank allocation (Zhang et al. 2023), with the semantics of PEFT 0.21.2's
//! `RankAllocator` and `AdaLoraModel.update_and_allocate` / `AdaLoraModel.forward`:
//!
//! - after each optimizer step, [`RankAllocator::update_and_allocate`] smooths every entry's
//!   sensitivity `|w * grad|` of `A`, `E` and `B` (`beta1`) and its uncertainty
//!   `|sensitivity - smoothed|` (`beta2`); each singular value's score is
//!   `score(E_i) + mean_j score(A_ij) + mean_k score(B_ki)`, with `score = smoothed sensitivity *
//!   smoothed uncertainty`;
//! - the budget of singular values falls from `init_r * modules` to `target_r * modules` on a
//!   cubic between `tinit` and `total_step - tfinal` ([`RankAllocator::budget`]); every `deltaT`
//!   steps of that phase the singular values scoring at or below the `(init budget - budget)`-th
//!   smallest score over all modules are set to 0 (they may come back: the optimizer still trains
//!   them, and scores move);
//! - at step `total_step - tfinal` the final mask (at the target budget) is made and recorded as
//!   the [`rank_pattern`](RankAllocator::rank_pattern); after it, each step re-applies it;
//! - [`RankAllocator::orth_penalty`] is PEFT's orthogonal regulariser, to add to the loss:
//!   `orth_reg_weight * mean over every A and B of ||P P^T - I||_F` (`A A^T` for `A`, `B^T B`
//!   for `B`).
//!
//! As in PEFT, `ranknum` (the scaling's divisor) stays `init_r` throughout, and pruning does not
//! reset the optimizer's moments. [`RankAllocator::prune`] ends a run: it drops the masked
//! singular values from the adapters, so that saving writes PEFT's file (the kept rows, the
//! `rank_pattern` in the config).
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_nn::{Linear, VarMap};
//! use lora_runtime::train::{RankAllocator, Trainer, TrainerConfig};
//! use lora_runtime::{AdaLoraSchedule, InitOptions, LayerConfig, LoraLinear, LoraModelExt};
//!
//! let dev = Device::Cpu;
//! let mut layer = LoraLinear::from(Linear::new(Tensor::randn(0f32, 1., (8, 8), &dev)?, None));
//! let schedule = AdaLoraSchedule { target_r: 2, tinit: 2, tfinal: 2, total_step: Some(10), ..Default::default() };
//! let config = LayerConfig::new(4, 8.0).with_adalora(Some(schedule));
//! layer.init_adapter_with(&VarMap::new(), &InitOptions::default().with_config(config))?;
//! let mut trainer = Trainer::new(layer.named_trainable_vars(), TrainerConfig { lr: 1e-2, ..Default::default() })?;
//! trainer.keep_step_grads(true);
//! let mut allocator = RankAllocator::new(&layer)?;
//! let x = Tensor::randn(0f32, 1., (4, 8), &dev)?;
//! for _ in 0..10 {
//!     let loss = (layer.forward(&x)?.sqr()?.mean_all()? + allocator.orth_penalty()?)?;
//!     trainer.backward(&loss)?;
//!     let step = trainer.step()?.step;
//!     allocator.update_and_allocate(step, |v| trainer.step_grad(v).cloned())?;
//! }
//! // One module: the budget ends at its target rank.
//! let kept = allocator.rank_pattern().and_then(|p| p.get("lora_E")).map(|m| m.iter().filter(|&&k| k).count());
//! assert_eq!(kept, Some(2));
//! allocator.prune(&mut layer)?;
//! assert_eq!(layer.adapter().map(|a| (a.rank(), a.ranknum())), Some((2, Some(4))));
//! # Ok::<(), lora_runtime::Error>(())
//! ```

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use crate::config::AdaLoraSchedule;
use crate::error::{Error, Result};
use crate::model::{layers, LoraModel, ModulePath};

/// The file [`RankAllocator::save_state`] writes in a checkpoint directory.
pub const ADALORA_STATE_FILE: &str = "adalora_state.safetensors";

/// What the allocation kept: `<module path>.lora_E` -> one boolean per singular value (PEFT's
/// AdaLoRA `rank_pattern`).
pub type RankPattern = BTreeMap<String, Vec<bool>>;

/// The smoothed sensitivity and uncertainty of one factor (PEFT's `exp_avg_ipt`,
/// `exp_avg_unc`), in f32.
#[derive(Debug, Clone)]
struct Smoothed {
    ipt: Tensor,
    unc: Tensor,
}

/// One module's triplet: the variables the model trains (shared storage) and their statistics.
#[derive(Debug)]
struct Triplet {
    /// The module path.
    path: String,
    /// `A`, `E`, `B`, in that order.
    vars: [Var; 3],
    /// Their statistics, `None` before the first update (PEFT's zeros) and after the final mask.
    stats: [Option<Smoothed>; 3],
}

/// The factor names of a triplet, in the order of [`Triplet::vars`].
const FACTORS: [&str; 3] = ["lora_A", "lora_E", "lora_B"];

impl Triplet {
    /// The key of this module in a rank pattern.
    fn e_key(&self) -> String {
        key(&self.path, "lora_E")
    }

    /// `score(E_i) + (mean_j score(A_ij) + mean_k score(B_ki))`, as PEFT's `mask_to_budget`.
    fn scores(&self) -> Result<Vec<f32>> {
        let [Some(a), Some(e), Some(b)] = &self.stats else {
            return Err(Error::Training {
                reason: format!(
                    "AdaLoRA: `{}` has no sensitivity yet: call `update_and_allocate` after every step",
                    self.path
                ),
            });
        };
        let score = |s: &Smoothed| &s.ipt * &s.unc;
        let a = score(a)?.mean(1)?;
        let b = score(b)?.mean(0)?;
        let e = score(e)?.flatten_all()?;
        Ok((e + (a + b)?)?.to_vec1::<f32>()?)
    }

    /// Sets the singular values `keep` does not mark to 0 (PEFT's `masked_fill_`).
    fn mask(&self, keep: &[bool]) -> Result<()> {
        let e = &self.vars[1];
        let flags: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
        let keep = Tensor::from_vec(flags, (keep.len(), 1), e.device())?;
        e.set(&keep.where_cond(e.as_tensor(), &e.zeros_like()?)?)?;
        Ok(())
    }
}

/// `<path>.<factor>` (just the factor for a model that is one layer).
fn key(path: &str, factor: &str) -> String {
    if path.is_empty() {
        factor.to_string()
    } else {
        format!("{path}.{factor}")
    }
}

/// PEFT's rank allocator for the AdaLoRA adapters of a model: call
/// [`update_and_allocate`](Self::update_and_allocate) after each optimizer step with that
/// step's gradients, add [`orth_penalty`](Self::orth_penalty) to each loss, and
/// [`prune`](Self::prune) the model before saving. See the [module docs](self).
#[derive(Debug)]
pub struct RankAllocator {
    schedule: AdaLoraSchedule,
    /// `total_step`, checked to be set.
    total_step: u64,
    /// The sum of the modules' ranks (PEFT's `init_bgt`).
    init_budget: usize,
    /// `target_r` times the number of modules (PEFT's `target_bgt`).
    target_budget: usize,
    triplets: Vec<Triplet>,
    rank_pattern: Option<RankPattern>,
}

impl RankAllocator {
    /// An allocator for the active AdaLoRA adapters of `model`, with their schedule (checked as
    /// PEFT's `AdaLoraConfig` checks it). It shares the adapters' variables: masking changes
    /// the model's `E`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when no active adapter is AdaLoRA, when they mix schedules, for
    /// a `total_step` that is missing or 0, `tinit >= total_step - tfinal`, `deltaT` 0, betas
    /// outside `(0, 1)` or a negative `orth_reg_weight`.
    pub fn new<M: LoraModel + ?Sized>(model: &M) -> Result<Self> {
        let mut schedule: Option<AdaLoraSchedule> = None;
        let mut triplets = Vec::new();
        for (path, layer, _) in layers(model) {
            let Some(ad) = layer.adapter() else { continue };
            let (Some(e), Some(s)) = (ad.e(), ad.adalora_schedule()) else {
                continue;
            };
            if schedule.is_some_and(|first| first != *s) {
                return Err(invalid(
                    "total_step",
                    format!(
                        "layer `{path}` has another AdaLoRA schedule than the layers before it"
                    ),
                ));
            }
            schedule = Some(*s);
            triplets.push(Triplet {
                path,
                vars: [ad.a().clone(), e.clone(), ad.b().clone()],
                stats: [None, None, None],
            });
        }
        let Some(schedule) = schedule else {
            return Err(invalid(
                "peft_type",
                "the model has no active AdaLoRA adapter to allocate ranks for".into(),
            ));
        };
        let total_step = check_schedule(&schedule)?;
        let init_budget = triplets.iter().map(|t| t.vars[0].dims()[0]).sum();
        let target_budget = schedule.target_r * triplets.len();
        Ok(Self {
            schedule,
            total_step,
            init_budget,
            target_budget,
            triplets,
            rank_pattern: None,
        })
    }

    /// The schedule it follows.
    pub fn schedule(&self) -> &AdaLoraSchedule {
        &self.schedule
    }

    /// The last mask made: after step `total_step - tfinal`, the final one (`None` before the
    /// first allocation).
    pub fn rank_pattern(&self) -> Option<&RankPattern> {
        self.rank_pattern.as_ref()
    }

    /// PEFT's `budget_schedule`: the number of singular values to keep at `step` and whether
    /// `step` masks. `init_r * modules` up to `tinit`; then `int((init - target) * (1 - (step -
    /// tinit) / (total_step - tfinal - tinit))^3 + target)`, masking when `step % deltaT == 0`;
    /// after `total_step - tfinal`, the target budget, masking every step.
    ///
    /// ```
    /// use lora_runtime::AdaLoraSchedule;
    /// use lora_runtime::train::RankAllocator;
    /// let s = AdaLoraSchedule { target_r: 2, tinit: 2, tfinal: 3, delta_t: 2, total_step: Some(12), ..Default::default() };
    /// // 6 modules of rank 4: 24 singular values down to 12.
    /// let budgets: Vec<_> = (0..=13).map(|t| RankAllocator::budget_at(&s, 24, 12, t)).collect();
    /// assert_eq!(budgets[2], (24, false));
    /// assert_eq!(budgets[4], (16, true));
    /// assert_eq!(budgets[10], (12, true));
    /// ```
    pub fn budget(&self, step: u64) -> (usize, bool) {
        Self::budget_at(&self.schedule, self.init_budget, self.target_budget, step)
    }

    /// [`budget`](Self::budget) for a schedule and budgets given (a `total_step` of `None`
    /// counts as 0).
    pub fn budget_at(
        schedule: &AdaLoraSchedule,
        init_budget: usize,
        target_budget: usize,
        step: u64,
    ) -> (usize, bool) {
        let (tinit, tfinal) = (schedule.tinit as f64, schedule.tfinal as f64);
        let total = schedule.total_step.unwrap_or(0) as f64;
        let t = step as f64;
        if t <= tinit {
            (init_budget, false)
        } else if t > total - tfinal {
            (target_budget, true)
        } else {
            // Python's float arithmetic: `mul_coeff ** 3` is C's `pow`, `int()` truncates.
            let mul = 1.0 - (t - tinit) / (total - tfinal - tinit);
            let (init, target) = (init_budget as f64, target_budget as f64);
            let budget = ((init - target) * mul.powf(3.0) + target).trunc().max(0.0) as usize;
            (budget, step.is_multiple_of(schedule.delta_t.max(1) as u64))
        }
    }

    /// PEFT's `update_and_allocate(global_step)`, to call after each optimizer step with its
    /// gradients (`grad(var)`, e.g. `|v| trainer.step_grad(v).cloned()` with
    /// [`Trainer::keep_step_grads`](crate::train::Trainer::keep_step_grads)): before
    /// `total_step - tfinal`, updates the scores and masks on the steps the budget says; at it,
    /// makes the final mask at the target budget and drops the scores; after it, re-applies
    /// the final mask. Returns the mask made at this step, if any.
    ///
    /// # Errors
    /// [`Error::Training`] for a missing gradient or one of another shape, a step after
    /// `total_step - tfinal` with no final mask (the step at it was skipped); candle errors.
    pub fn update_and_allocate(
        &mut self,
        step: u64,
        grad: impl Fn(&Var) -> Option<Tensor>,
    ) -> Result<Option<&RankPattern>> {
        let end = self.total_step - self.schedule.tfinal as u64;
        if step < end {
            self.update_scores(&grad)?;
            let (budget, masks) = self.budget(step);
            if !masks {
                return Ok(None);
            }
            self.rank_pattern = Some(self.mask_to_budget(budget)?);
        } else if step == end {
            let (budget, _) = self.budget(step);
            self.rank_pattern = Some(self.mask_to_budget(budget)?);
            for t in &mut self.triplets {
                t.stats = [None, None, None];
            }
        } else {
            let Some(pattern) = &self.rank_pattern else {
                return Err(Error::Training {
                    reason: format!(
                        "AdaLoRA: step {step} is after the final allocation (step {end}) but no \
                         mask was made: call `update_and_allocate` after every step"
                    ),
                });
            };
            for t in &self.triplets {
                if let Some(keep) = pattern.get(&t.e_key()) {
                    t.mask(keep)?;
                }
            }
            return Ok(None);
        }
        Ok(self.rank_pattern.as_ref())
    }

    /// PEFT's `update_ipt`: `ipt = |w * grad|`, `exp_avg_ipt = beta1 exp_avg_ipt + (1 - beta1)
    /// ipt`, `exp_avg_unc = beta2 exp_avg_unc + (1 - beta2) |ipt - exp_avg_ipt|`, in f32 with
    /// PyTorch's order of operations. Nothing changes on error.
    fn update_scores(&mut self, grad: &impl Fn(&Var) -> Option<Tensor>) -> Result<()> {
        let (b1, b2) = (self.schedule.beta1, self.schedule.beta2);
        let mut updated = Vec::with_capacity(self.triplets.len());
        for t in &self.triplets {
            let mut stats: [Option<Smoothed>; 3] = [None, None, None];
            for (i, var) in t.vars.iter().enumerate() {
                let name = key(&t.path, FACTORS[i]);
                let g = grad(var).ok_or_else(|| Error::Training {
                    reason: format!("AdaLoRA: no gradient for `{name}` in this step"),
                })?;
                if g.dims() != var.dims() {
                    return Err(Error::Training {
                        reason: format!(
                            "AdaLoRA: the gradient of `{name}` has shape {:?}, the variable {:?}",
                            g.dims(),
                            var.dims()
                        ),
                    });
                }
                // Detached: scores kept across steps must not hold the steps' graphs alive.
                let w = var.as_tensor().detach().to_dtype(DType::F32)?;
                let ipt = (w * g.detach().to_dtype(DType::F32)?)?.abs()?;
                let (old_ipt, old_unc) = match &t.stats[i] {
                    Some(s) => (s.ipt.clone(), s.unc.clone()),
                    None => (ipt.zeros_like()?, ipt.zeros_like()?),
                };
                let exp_ipt = ((old_ipt * b1)? + (&ipt * (1.0 - b1))?)?;
                let unc = (&ipt - &exp_ipt)?.abs()?;
                let exp_unc = ((old_unc * b2)? + (unc * (1.0 - b2))?)?;
                stats[i] = Some(Smoothed {
                    ipt: exp_ipt,
                    unc: exp_unc,
                });
            }
            updated.push(stats);
        }
        for (t, stats) in self.triplets.iter_mut().zip(updated) {
            t.stats = stats;
        }
        Ok(())
    }

    /// PEFT's `mask_to_budget`: the threshold is the `(init budget - budget)`-th smallest score
    /// of all singular values (`torch.kthvalue`); every singular value scoring at or below it
    /// is set to 0 (ties included), the others kept. A budget at or above the initial one masks
    /// nothing (PEFT's `kthvalue` would refuse `k = 0`).
    fn mask_to_budget(&self, budget: usize) -> Result<RankPattern> {
        let scores = self
            .triplets
            .iter()
            .map(Triplet::scores)
            .collect::<Result<Vec<_>>>()?;
        let k = self.init_budget.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
            // `kthvalue` sorts NaN last, as `total_cmp` does for positive NaN.
            all.sort_by(f32::total_cmp);
            all.get(k - 1).copied().unwrap_or(f32::INFINITY)
        };
        let mut pattern = RankPattern::new();
        for (t, s) in self.triplets.iter().zip(scores) {
            // PEFT keeps `~(score <= threshold)`: a NaN score is kept.
            let keep: Vec<bool> = s
                .iter()
                .map(|v| {
                    !matches!(
                        v.partial_cmp(&threshold),
                        Some(Ordering::Less | Ordering::Equal)
                    )
                })
                .collect();
            t.mask(&keep)?;
            pattern.insert(t.e_key(), keep);
        }
        Ok(pattern)
    }

    /// PEFT's orthogonal regulariser, weighted: `orth_reg_weight * mean over every A and B of
    /// ||P P^T - I||_F` (`A A^T` for `A [r, in]`, `B^T B` for `B [out, r]`), a scalar in the
    /// factors' dtype with gradients to them. Add it to each loss (divided by the micro-batches
    /// per step when accumulating gradients, so that a step counts it once).
    ///
    /// # Errors
    /// Candle errors.
    pub fn orth_penalty(&self) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for t in &self.triplets {
            let [a, _, b] = &t.vars;
            for cov in [
                a.as_tensor().matmul(&a.as_tensor().t()?)?,
                b.as_tensor().t()?.matmul(b.as_tensor())?,
            ] {
                let eye = Tensor::eye(cov.dims()[0], cov.dtype(), cov.device())?;
                let norm = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
                sum = Some(match sum {
                    Some(s) => (s + norm)?,
                    None => norm,
                });
            }
        }
        let count = 2 * self.triplets.len();
        match sum {
            Some(s) => Ok((s * (self.schedule.orth_reg_weight / count as f64))?),
            None => Err(Error::Training {
                reason: "AdaLoRA: no modules to regularise".into(),
            }),
        }
    }

    /// Replaces each active AdaLoRA adapter of `model` by the singular values the final
    /// [`rank_pattern`](Self::rank_pattern) kept (see
    /// [`Adapter::pruned_to`](crate::Adapter::pruned_to)), so that saving writes PEFT's file: the
    /// kept rows and the `rank_pattern`. Nothing to do before an allocation. A module left with
    /// no singular value keeps its rank with `E = 0` (PEFT's file would hold empty tensors, which
    /// neither side loads), and the file gives it no pattern. The allocator's variables are then
    /// no longer the model's: make a new one to train on.
    ///
    /// # Errors
    /// [`Error::Layer`] naming the module; nothing changes on error.
    pub fn prune<M: LoraModel + ?Sized>(&self, model: &mut M) -> Result<()> {
        let Some(pattern) = &self.rank_pattern else {
            return Ok(());
        };
        let mut pruned = HashMap::new();
        for (path, layer, _) in layers(model) {
            let (Some(name), Some(ad)) = (layer.active_adapter_name(), layer.adapter()) else {
                continue;
            };
            let Some(keep) = pattern.get(&key(&path, "lora_E")) else {
                continue;
            };
            if ad.is_adalora() && keep.contains(&true) {
                let ad = ad.pruned_to(keep).map_err(|e| e.at(&path))?;
                pruned.insert(path, (name.to_string(), ad));
            }
        }
        model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |path, layer, _| {
            if let Some((name, ad)) = pruned.remove(path.as_str()) {
                layer.adapter_set_mut().insert(&name, ad);
            }
            Ok(())
        })
    }

    /// Writes the scores and the rank pattern to `dir/adalora_state.safetensors` (atomically),
    /// for a checkpoint that resumes exactly.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for t in &self.triplets {
            for (i, stats) in t.stats.iter().enumerate() {
                if let Some(s) = stats {
                    let name = key(&t.path, FACTORS[i]);
                    tensors.push((format!("{name}.exp_avg_ipt"), s.ipt.clone()));
                    tensors.push((format!("{name}.exp_avg_unc"), s.unc.clone()));
                }
            }
        }
        let path = dir.join(ADALORA_STATE_FILE);
        let mut metadata = HashMap::new();
        if let Some(pattern) = &self.rank_pattern {
            let json = serde_json::to_string(pattern).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
            metadata.insert("rank_pattern".to_string(), json);
        }
        super::write_safetensors(&path, &tensors, metadata)
    }

    /// Restores what [`save_state`](Self::save_state) wrote; the allocator is unchanged on
    /// error.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::SafeTensors`] naming the file; [`Error::BadTensor`] naming a score
    /// that does not fit its variable; [`Error::BadMetadata`] for a rank pattern that does not
    /// fit the modules.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(ADALORA_STATE_FILE);
        let (tensors, metadata) = super::read_safetensors(&path)?;
        let bad_meta = |reason: String| Error::BadMetadata {
            file: path.clone(),
            key: "rank_pattern".into(),
            reason,
        };
        let pattern = metadata
            .get("rank_pattern")
            .map(|s| serde_json::from_str::<RankPattern>(s).map_err(|e| bad_meta(e.to_string())))
            .transpose()?;
        if let Some(pattern) = &pattern {
            for t in &self.triplets {
                let n = t.vars[1].dims()[0];
                if pattern.get(&t.e_key()).is_some_and(|m| m.len() != n) {
                    return Err(bad_meta(format!("`{}` has not {n} entries", t.e_key())));
                }
            }
        }
        let mut stats = Vec::with_capacity(self.triplets.len());
        for t in &self.triplets {
            let mut s: [Option<Smoothed>; 3] = [None, None, None];
            for (i, var) in t.vars.iter().enumerate() {
                let name = key(&t.path, FACTORS[i]);
                let get = |what: &str| -> Result<Option<Tensor>> {
                    let k = format!("{name}.{what}");
                    let Some(v) = tensors.get(&k) else {
                        return Ok(None);
                    };
                    if v.dims() != var.dims() {
                        return Err(Error::BadTensor {
                            file: path.clone(),
                            key: k,
                            reason: format!(
                                "shape {:?}, the variable's {:?}",
                                v.dims(),
                                var.dims()
                            ),
                        });
                    }
                    Ok(Some(v.to_dtype(DType::F32)?.to_device(var.device())?))
                };
                if let (Some(ipt), Some(unc)) = (get("exp_avg_ipt")?, get("exp_avg_unc")?) {
                    s[i] = Some(Smoothed { ipt, unc });
                }
            }
            stats.push(s);
        }
        for (t, s) in self.triplets.iter_mut().zip(stats) {
            t.stats = s;
        }
        self.rank_pattern = pattern;
        Ok(())
    }
}

/// The `InvalidConfig` error of an AdaLoRA setting.
fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidConfig {
        file: None,
        field: field.into(),
        reason,
    }
}

/// PEFT's `AdaLoraConfig` checks and the allocator's own: returns `total_step`.
fn check_schedule(s: &AdaLoraSchedule) -> Result<u64> {
    let total = match s.total_step {
        Some(t) if t > 0 => t,
        _ => {
            return Err(invalid(
                "total_step",
                "AdaLoRA needs the number of training steps, above 0".into(),
            ))
        }
    };
    if s.tinit + s.tfinal >= total {
        return Err(invalid(
            "tinit",
            format!(
                "tinit {} must be below total_step - tfinal = {total} - {}: no step is left to \
                 allocate ranks in (lower tinit / tfinal or train longer)",
                s.tinit, s.tfinal
            ),
        ));
    }
    if s.delta_t == 0 {
        return Err(invalid("deltaT", "must be at least 1".into()));
    }
    for (field, beta) in [("beta1", s.beta1), ("beta2", s.beta2)] {
        if !(beta > 0.0 && beta < 1.0) {
            return Err(invalid(field, format!("must be in (0, 1), got {beta}")));
        }
    }
    if !(s.orth_reg_weight >= 0.0 && s.orth_reg_weight.is_finite()) {
        return Err(invalid(
            "orth_reg_weight",
            format!("must be 0 or more, got {}", s.orth_reg_weight),
        ));
    }
    Ok(total as u64)
}

impl AdaLoraSchedule {
    /// Checks the schedule as PEFT's `AdaLoraConfig` does (and as
    /// [`RankAllocator::new`] will): `total_step` set and above 0, `tinit < total_step -
    /// tfinal`, `deltaT >= 1`, betas in `(0, 1)`, `orth_reg_weight >= 0`.
    ///
    /// ```
    /// use lora_runtime::AdaLoraSchedule;
    /// let s = AdaLoraSchedule { tinit: 5, tfinal: 5, total_step: Some(10), ..Default::default() };
    /// assert!(s.check().is_err());
    /// assert!(AdaLoraSchedule { total_step: Some(11), ..s }.check().is_ok());
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the field.
    pub fn check(&self) -> Result<()> {
        check_schedule(self).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InitOptions, LayerConfig, LoraLinear, LoraModelExt};
    use candle_core::Device;
    use candle_nn::VarMap;

    fn layer(schedule: Option<AdaLoraSchedule>) -> LoraLinear {
        let w = Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap();
        let mut l = LoraLinear::new(w, None);
        let config = LayerConfig::new(3, 6.0).with_adalora(schedule);
        l.init_adapter_with(&VarMap::new(), &InitOptions::default().with_config(config))
            .unwrap();
        l
    }

    fn schedule() -> AdaLoraSchedule {
        AdaLoraSchedule {
            target_r: 1,
            tinit: 1,
            tfinal: 1,
            total_step: Some(4),
            ..AdaLoraSchedule::default()
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let err = RankAllocator::new(&layer(None)).unwrap_err().to_string();
        assert!(err.contains("no active AdaLoRA adapter"), "{err}");
        for (bad, field) in [
            (
                AdaLoraSchedule {
                    total_step: None,
                    ..schedule()
                },
                "total_step",
            ),
            (
                AdaLoraSchedule {
                    tinit: 3,
                    ..schedule()
                },
                "tinit",
            ),
            (
                AdaLoraSchedule {
                    delta_t: 0,
                    ..schedule()
                },
                "deltaT",
            ),
            (
                AdaLoraSchedule {
                    beta2: 1.0,
                    ..schedule()
                },
                "beta2",
            ),
            (
                AdaLoraSchedule {
                    orth_reg_weight: -1.0,
                    ..schedule()
                },
                "orth_reg_weight",
            ),
        ] {
            let err = RankAllocator::new(&layer(Some(bad)))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let mut alloc = RankAllocator::new(&layer(Some(schedule()))).unwrap();
        let err = alloc
            .update_and_allocate(1, |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no gradient for `lora_A`"), "{err}");
        let err = alloc
            .update_and_allocate(4, |v| v.zeros_like().ok())
            .unwrap_err()
            .to_string();
        assert!(err.contains("after the final allocation (step 3)"), "{err}");
    }

    /// Scores kept across steps hold no graph: a step's activations are freed after it.
    #[test]
    fn kept_gradients_and_scores_hold_no_graph() {
        use crate::train::{Trainer, TrainerConfig};
        use candle_core::Module;
        let l = layer(Some(schedule()));
        let mut trainer = Trainer::new(l.named_trainable_vars(), TrainerConfig::default()).unwrap();
        trainer.keep_step_grads(true);
        let mut alloc = RankAllocator::new(&l).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
        let loss = (l.forward(&x).unwrap().sqr().unwrap().mean_all().unwrap()
            + alloc.orth_penalty().unwrap())
        .unwrap();
        trainer.backward(&loss).unwrap();
        let step = trainer.step().unwrap().step;
        let ad = l.adapter().unwrap();
        let a = trainer.step_grad(ad.a()).unwrap();
        assert!(!a.track_op());
        // Gradients straight from a backward pass (they carry the graph) are detached too.
        let store = loss.backward().unwrap();
        alloc
            .update_and_allocate(step, |v| store.get(v.as_tensor()).cloned())
            .unwrap();
        for s in alloc.triplets[0].stats.iter().flatten() {
            assert!(!s.ipt.track_op() && !s.unc.track_op());
        }
    }

    #[test]
    fn ties_at_the_threshold_are_all_masked_and_the_final_mask_stays() {
        let l = layer(Some(schedule()));
        let ad = l.adapter().unwrap();
        let e = ad.e().unwrap();
        for v in [ad.a(), ad.b(), e] {
            v.set(&v.ones_like().unwrap()).unwrap();
        }
        let mut alloc = RankAllocator::new(&l).unwrap();
        // Equal factors and gradients: every singular value scores the same, so the threshold
        // (the 2nd smallest score at step 2) masks all three, as PEFT's `<=` does.
        let grad = |v: &Var| v.ones_like().ok();
        assert_eq!(alloc.update_and_allocate(1, grad).unwrap(), None);
        let pattern = alloc.update_and_allocate(2, grad).unwrap().cloned();
        assert_eq!(pattern.unwrap()["lora_E"], vec![false; 3]);
        let pattern = alloc.update_and_allocate(3, grad).unwrap().cloned();
        assert_eq!(pattern.unwrap()["lora_E"], vec![false; 3]);
        e.set(&e.ones_like().unwrap()).unwrap();
        assert_eq!(alloc.update_and_allocate(4, grad).unwrap(), None);
        assert_eq!(
            e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0; 3]
        );
    }
}
