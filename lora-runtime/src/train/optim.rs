//! AdamW with a state that can be saved and restored exactly (candle-nn's keeps its moments
//! private, so a resumed run could not continue where it stopped).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW's hyper-parameters other than the learning rate (which the schedule gives each step).
/// Defaults are PyTorch's and transformers' (`betas = (0.9, 0.999)`, `eps = 1e-8`), with no
/// weight decay (the `lora train` default; PyTorch's own default is 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// The first moment's decay.
    pub beta1: f64,
    /// The second moment's decay.
    pub beta2: f64,
    /// Added to the second moment's square root.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameters by `1 - lr * weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One optimized variable and its moments.
#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// This variable's learning rate is the step's times this (LoRA+ gives `B` a larger one).
    lr_scale: f64,
}

/// One step's constants.
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bias1: f64,
    bias2_sqrt: f64,
}

impl Param {
    /// The whole update in one pass over f32 CPU values (the composed form makes a dozen
    /// parameter-sized temporaries, which dominates a full fine-tuning step's optimizer time).
    fn fused_cpu_update(&mut self, g: &Tensor, h: &Hyper) -> candle_core::Result<()> {
        let shape = self.var.shape().clone();
        let device = self.var.device().clone();
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let mut m = self.m.flatten_all()?.to_vec1::<f32>()?;
        let mut v = self.v.flatten_all()?.to_vec1::<f32>()?;
        let mut theta = self.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let decay = (1.0 - h.lr * h.weight_decay) as f32;
        let step = (h.lr / h.bias1) as f32;
        let (inv_bias2, eps) = ((1.0 / h.bias2_sqrt) as f32, h.eps as f32);
        for (((t, m), v), g) in theta.iter_mut().zip(&mut m).zip(&mut v).zip(&g) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *t = *t * decay - step * *m / (v.sqrt() * inv_bias2 + eps);
        }
        self.m = Tensor::from_vec(m, &shape, &device)?;
        self.v = Tensor::from_vec(v, &shape, &device)?;
        self.var.set(&Tensor::from_vec(theta, &shape, &device)?)
    }
}

/// AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments),
/// over named variables so its state can be saved by name.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    steps: u64,
}

/// The key of a moment in a saved state: `<variable>.exp_avg` / `.exp_avg_sq`, PyTorch's names.
fn moment_key(name: &str, second: bool) -> String {
    if second {
        format!("{name}.exp_avg_sq")
    } else {
        format!("{name}.exp_avg")
    }
}

impl AdamW {
    /// An optimizer for `vars`, with zero moments.
    ///
    /// # Errors
    /// [`Error::Training`] for two variables with the same name; a candle error allocating the
    /// moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                if !seen.insert(name.clone()) {
                    return Err(Error::Training {
                        reason: format!("two variables are named `{name}`"),
                    });
                }
                let m = var.zeros_like()?;
                let v = var.zeros_like()?;
                Ok(Param {
                    name,
                    var,
                    m,
                    v,
                    lr_scale: 1.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            config,
            steps: 0,
        })
    }

    /// The number of steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Sets each variable's learning-rate multiplier from its name (PyTorch's parameter
    /// groups, e.g. [`loraplus`](super::loraplus)).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    /// The optimized variables with their names.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// One step with learning rate `lr`; `grads[i]` is the gradient of the `i`-th variable
    /// (`None`: no gradient reached it, and it is left as it is, as PyTorch skips a parameter
    /// whose `.grad` is `None`).
    ///
    /// # Errors
    /// [`Error::Training`] when the gradients do not match the variables; candle errors.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::Training {
                reason: format!(
                    "{} gradients for {} variables",
                    grads.len(),
                    self.params.len()
                ),
            });
        }
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            if g.dims() != p.var.dims() {
                return Err(Error::Training {
                    reason: format!(
                        "the gradient of `{}` has shape {:?}, the variable {:?}",
                        p.name,
                        g.dims(),
                        p.var.dims()
                    ),
                });
            }
            let g = g.to_dtype(p.m.dtype())?;
            let lr = lr * p.lr_scale;
            let h = Hyper {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                bias1,
                bias2_sqrt,
            };
            if p.var.dtype() == DType::F32 && p.var.device().is_cpu() {
                p.fused_cpu_update(&g, &h)?;
            } else {
                p.m = ((&p.m * beta1)? + (&g * (1.0 - beta1))?)?;
                p.v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let denom = ((p.v.sqrt()? / bias2_sqrt)? + eps)?;
                let update = ((&p.m / &denom)? * (lr / bias1))?;
                let theta = p.var.as_tensor();
                let decayed = if weight_decay == 0.0 {
                    theta.clone()
                } else {
                    (theta * (1.0 - lr * weight_decay))?
                };
                p.var.set(&(decayed - update)?)?;
            }
        }
        Ok(())
    }

    /// The moments by name (`<variable>.exp_avg`, `<variable>.exp_avg_sq`), to save.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| {
                [
                    (moment_key(&p.name, false), p.m.clone()),
                    (moment_key(&p.name, true), p.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors) after `steps` steps.
    /// Every variable must have both moments, of its shape; nothing changes otherwise.
    ///
    /// # Errors
    /// [`Error::Training`] naming the missing, unexpected or misshapen moment.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let mut moments = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let m = take_moment(&mut tensors, moment_key(&p.name, false), p.var.dims())?;
            let v = take_moment(&mut tensors, moment_key(&p.name, true), p.var.dims())?;
            moments.push((m, v));
        }
        if let Some(key) = tensors.keys().min() {
            return Err(Error::Training {
                reason: format!("optimizer state `{key}` matches no variable"),
            });
        }
        for (p, (m, v)) in self.params.iter_mut().zip(moments) {
            let dtype = p.var.dtype();
            let device = p.var.device();
            p.m = m.to_dtype(dtype)?.to_device(device)?;
            p.v = v.to_dtype(dtype)?.to_device(device)?;
        }
        self.steps = steps;
        Ok(())
    }
}

/// Removes the moment `key` from `tensors`, checked to have the variable's shape `dims`.
fn take_moment(
    tensors: &mut HashMap<String, Tensor>,
    key: String,
    dims: &[usize],
) -> Result<Tensor> {
    match tensors.remove(&key) {
        Some(t) if t.dims() == dims => Ok(t),
        Some(t) => Err(Error::Training {
            reason: format!(
                "optimizer state `{key}` has shape {:?}, the variable {dims:?}",
                t.dims()
            ),
        }),
        None => Err(Error::Training {
            reason: format!("optimizer state `{key}` is missing"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = [1, -2] with gradients [0.5, 0.25]
    /// then [-1, 2]: p after two steps, computed by hand from PyTorch's update rule.
    #[test]
    fn two_steps_follow_pytorchs_rule() {
        let var = Var::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], config).unwrap();
        let mut expect = [1f64, -2.0];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in [[0.5f64, 0.25], [-1.0, 2.0]].iter().enumerate() {
            let gt = Tensor::new(&[g[0] as f32, g[1] as f32], &Device::Cpu).unwrap();
            opt.step(&[Some(gt)], 0.1).unwrap();
            let t = t as i32 + 1;
            for i in 0..2 {
                expect[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                expect[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for (g, e) in got.iter().zip(expect) {
            // f32 arithmetic against f64: a few ulps (1.2e-7 relative each) of each operation.
            assert!(
                (f64::from(*g) - e).abs() < 2e-6 * e.abs(),
                "{got:?} vs {expect:?}"
            );
        }
    }

    /// Adam's first step moves each entry by the learning rate times the gradient's sign: with
    /// a scale of 4 on `b`, by four times as much.
    #[test]
    fn learning_rate_scales_apply_per_variable() {
        let a = Var::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let b = Var::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let vars = vec![
            ("x.lora_A.weight".into(), a.clone()),
            ("x.lora_B.weight".into(), b.clone()),
        ];
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        opt.set_lr_scales(crate::train::loraplus(4.0));
        let g = Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap();
        opt.step(&[Some(g.clone()), Some(g)], 0.01).unwrap();
        let (a, b) = (
            a.as_tensor().to_vec1::<f32>().unwrap(),
            b.as_tensor().to_vec1::<f32>().unwrap(),
        );
        assert!(
            (a[0] - 0.99).abs() < 1e-6 && (a[1] - 1.01).abs() < 1e-6,
            "{a:?}"
        );
        assert!(
            (b[0] - 0.96).abs() < 1e-6 && (b[1] - 1.04).abs() < 1e-6,
            "{b:?}"
        );
    }

    #[test]
    fn state_round_trips_and_misfits_are_refused() {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut a = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
        a.step(&[Some(g.clone())], 0.01).unwrap();
        let state: HashMap<_, _> = a.state_tensors().into_iter().collect();
        let other = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut b = AdamW::new(vec![("w".into(), other)], AdamWConfig::default()).unwrap();
        let mut bad = state.clone();
        bad.insert("x.exp_avg".into(), g.clone());
        let err = b.load_state(bad, 1).unwrap_err().to_string();
        assert!(err.contains("`x.exp_avg` matches no variable"), "{err}");
        let mut missing = state.clone();
        missing.remove("w.exp_avg_sq");
        assert!(b
            .load_state(missing, 1)
            .unwrap_err()
            .to_string()
            .contains("w.exp_avg_sq"));
        assert_eq!(b.steps(), 0);
        b.load_state(state, 1).unwrap();
        assert_eq!(b.steps(), 1);
        for (k, t) in b.state_tensors() {
            let expect: HashMap<_, _> = a.state_tensors().into_iter().collect();
            assert_eq!(
                t.to_vec1::<f32>().unwrap(),
                expect[&k].to_vec1::<f32>().unwrap()
            );
        }
    }
}
