//! Training and evaluation: AdamW on random batches, masked cross-entropy, exact match.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor, Var, D};
use candle_nn::{Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

use super::data::{batch, Batch, Sequence};
use super::model::Gpt;

/// The knobs of one training run.
pub(crate) struct TrainConfig<'a> {
    /// Optimizer steps.
    pub(crate) steps: usize,
    /// AdamW's learning rate (no weight decay).
    pub(crate) lr: f64,
    /// Seed for drawing the batches.
    pub(crate) seed: u64,
    /// Longest sequence the model sees, in tokens.
    pub(crate) ctx: usize,
    /// Sequences per batch.
    pub(crate) batch_size: usize,
    /// The progress bar's label.
    pub(crate) label: &'a str,
}

/// How well a model does on a split.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scores {
    /// Mean cross-entropy of the sentence tokens.
    pub(crate) loss: f32,
    /// Share of sequences that greedy decoding reproduces exactly.
    pub(crate) exact: f64,
    /// Share of sentence tokens predicted right.
    pub(crate) acc: f64,
}

/// What a training run measured.
pub(crate) struct Trained {
    pub(crate) steps_per_s: f64,
}

fn bar(len: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>22} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Trains `vars` with AdamW on random batches of `seqs`.
pub(crate) fn train(
    model: &Gpt,
    vars: Vec<Var>,
    seqs: &[Sequence],
    config: &TrainConfig,
) -> Result<Trained> {
    let TrainConfig {
        steps,
        lr,
        seed,
        ctx,
        batch_size,
        label,
    } = *config;
    let mut opt = candle_nn::AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    let pb = bar(steps as u64, label);
    let start = Instant::now();
    let mut smooth = None;
    for step in 0..steps {
        let picks: Vec<&Sequence> = (0..batch_size)
            .filter_map(|_| seqs.choose(&mut rng))
            .collect();
        let b = batch(&picks, ctx)?;
        let (loss, _, _) = loss_and_accuracy(model, &b)?;
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        let s = smooth.map_or(l, |s: f32| 0.9 * s + 0.1 * l);
        smooth = Some(s);
        if step % 5 == 0 || step + 1 == steps {
            pb.set_message(format!("loss {s:.3}"));
        }
        pb.inc(1);
    }
    pb.finish();
    Ok(Trained {
        steps_per_s: steps as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Loss, exact match and token accuracy on `seqs`.
pub(crate) fn evaluate(model: &Gpt, seqs: &[Sequence], ctx: usize) -> Result<Scores> {
    let (mut loss, mut exact, mut acc, mut n) = (0f32, 0usize, 0f64, 0usize);
    for chunk in seqs.chunks(64) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let b = batch(&refs, ctx)?;
        let (l, ok, a) = loss_and_accuracy(model, &b)?;
        loss += l.to_scalar::<f32>()? * chunk.len() as f32;
        exact += ok.iter().filter(|x| **x).count();
        acc += a * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(Scores {
        loss: loss / n as f32,
        exact: exact as f64 / n as f64,
        acc: acc / n as f64,
    })
}

/// Masked mean cross-entropy, plus per-sequence "every target token is the arg-max" (which is
/// exactly "greedy decoding reproduces the reference") and the token accuracy.
fn loss_and_accuracy(model: &Gpt, b: &Batch) -> Result<(Tensor, Vec<bool>, f64)> {
    let logits = model.forward(&b.inputs)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&b.targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    let n = b.mask.sum_all()?;
    let loss = (picked.mul(&b.mask)?.sum_all()?.neg()? / n.to_scalar::<f32>()? as f64)?;
    let correct = logits
        .argmax(D::Minus1)?
        .eq(&b.targets)?
        .to_dtype(DType::F32)?;
    let wrong = ((1.0 - correct)? * &b.mask)?;
    let wrong_per_seq: Vec<f32> = wrong.sum(1)?.to_vec1()?;
    let total_wrong: f32 = wrong_per_seq.iter().sum();
    let count = n.to_scalar::<f32>()?;
    Ok((
        loss,
        wrong_per_seq.iter().map(|w| *w == 0.0).collect(),
        f64::from(1.0 - total_wrong / count),
    ))
}
