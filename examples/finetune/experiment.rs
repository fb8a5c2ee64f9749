//! The comparison: pre-train a base model, then adapt it with LoRA and with full fine-tuning,
//! each with the same step budget and learning-rate search, and measure both.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Var;
use candle_nn::VarMap;
use lora::prelude::*;

use super::data::Data;
use super::model::{build, init_seeded_adapter, Gpt, GptConfig, Mode};
use super::report::{peak_rss, reset_peak_rss, Row};
use super::train::{evaluate, train, Scores, TrainConfig};

/// What a run fixes up front: model and training sizes, the seed, the LoRA layers' rank and alpha,
/// where files go, the data.
pub(crate) struct Experiment {
    pub(crate) cfg: GptConfig,
    pub(crate) steps: usize,
    pub(crate) pretrain_steps: usize,
    pub(crate) batch_size: usize,
    pub(crate) seed: u64,
    pub(crate) lora: LayerConfig,
    pub(crate) work: PathBuf,
    pub(crate) data: Data,
}

impl Experiment {
    /// The pre-trained base model's weights file: trained now if `retrain` or not cached yet.
    pub(crate) fn pretrained_base(&self, retrain: bool) -> Result<PathBuf> {
        let cfg = &self.cfg;
        let path = self.work.join(format!(
            "base-d{}-l{}-s{}-p{}.safetensors",
            cfg.d_model, cfg.n_layer, self.seed, self.pretrain_steps
        ));
        if retrain || !path.exists() {
            let (model, varmap) = build(cfg, Mode::Full, None, self.seed)?;
            let config = TrainConfig {
                steps: self.pretrain_steps,
                lr: 3e-3,
                seed: self.seed,
                ctx: cfg.ctx,
                batch_size: self.batch_size,
                label: "pre-training base",
            };
            train(&model, varmap.all_vars(), &self.data.pretrain, &config)?;
            varmap.save(&path)?;
        } else {
            println!(
                "using the cached base model {} (--retrain to pre-train again)",
                path.display()
            );
        }
        Ok(path)
    }

    /// The model with the weights at `base_path`.
    pub(crate) fn build_on(&self, base_path: &Path, mode: Mode) -> Result<(Gpt, VarMap)> {
        build(&self.cfg, mode, Some(base_path), self.seed)
    }

    /// Scores on the held-out split (restaurant names never seen in training).
    pub(crate) fn held_out_scores(&self, model: &Gpt) -> Result<Scores> {
        evaluate(model, &self.data.held_out, self.cfg.ctx)
    }

    /// One method's adaptation: it tries two learning rates on a quarter of the steps, scored on
    /// the validation split, then trains for all the steps with the better one.
    pub(crate) fn adapt(
        &self,
        base_path: &Path,
        mode: Mode,
        total_params: usize,
    ) -> Result<Adapted> {
        let (name, lrs) = match mode {
            Mode::Lora => ("LoRA", [1e-1, 3e-2]),
            Mode::Full => ("full fine-tuning", [3e-3, 1e-3]),
        };
        let mut best = (f32::INFINITY, lrs[0]);
        for lr in lrs {
            let (model, vars) = self.start_from(base_path, mode)?;
            let config = TrainConfig {
                steps: (self.steps / 4).max(1),
                lr,
                seed: self.seed + 1,
                ctx: self.cfg.ctx,
                batch_size: self.batch_size,
                label: &format!("{name} lr {lr:e}"),
            };
            train(
                &model,
                trainable(&model, &vars, mode),
                &self.data.train,
                &config,
            )?;
            let loss = evaluate(&model, &self.data.valid, self.cfg.ctx)?.loss;
            if loss < best.0 {
                best = (loss, lr);
            }
        }
        let (model, vars) = self.start_from(base_path, mode)?;
        let params = trainable(&model, &vars, mode);
        let n_trainable: usize = params.iter().map(|v| v.elem_count()).sum();
        let config = TrainConfig {
            steps: self.steps,
            lr: best.1,
            seed: self.seed + 2,
            ctx: self.cfg.ctx,
            batch_size: self.batch_size,
            label: name,
        };
        reset_peak_rss();
        let trained = train(&model, params, &self.data.train, &config)?;
        let rss = peak_rss();
        let row = Row {
            name,
            trainable: n_trainable,
            total: match mode {
                Mode::Lora => total_params + n_trainable,
                Mode::Full => total_params,
            },
            // AdamW keeps two f32 moments per trainable parameter.
            opt_bytes: 2 * 4 * n_trainable as u64,
            rss,
            steps_per_s: trained.steps_per_s,
            lr: best.1,
            scores: self.held_out_scores(&model)?,
        };
        Ok(Adapted { model, vars, row })
    }

    /// The base model, ready to adapt: with a fresh adapter for LoRA, as it is for full
    /// fine-tuning.
    fn start_from(&self, base_path: &Path, mode: Mode) -> Result<(Gpt, VarMap)> {
        let (mut model, vars) = self.build_on(base_path, mode)?;
        if mode == Mode::Lora {
            init_seeded_adapter(&mut model, &VarMap::new(), &self.lora, self.seed)?;
        }
        Ok((model, vars))
    }
}

/// What each method trains: the adapter's factors for LoRA, every weight for full fine-tuning.
fn trainable(model: &Gpt, vars: &VarMap, mode: Mode) -> Vec<Var> {
    match mode {
        Mode::Lora => model.trainable_vars(),
        Mode::Full => vars.all_vars(),
    }
}

/// An adapted model, its base weights and its line of the table.
pub(crate) struct Adapted {
    pub(crate) model: Gpt,
    pub(crate) vars: VarMap,
    pub(crate) row: Row,
}
