//! Fine-tune a small GPT-style model with `#[lora]` on CPU, with full fine-tuning beside it.
//!
//! 1. Pre-trains a character-level decoder on a generated corpus of plain sentences (cached under
//!    `target/lora-example/`, `--retrain` to redo it).
//! 2. Adapts it to a new task in the spirit of the LoRA paper's E2E NLG experiment: turn a meaning
//!    representation (`name[Aromi] food[Thai] area[riverside]`) into a sentence. The held-out
//!    split uses restaurant names never seen in training.
//! 3. Runs the same adaptation with LoRA (rank r on `q_proj` and `v_proj`, as in the paper) and
//!    with full fine-tuning: same steps, same learning-rate search budget.
//! 4. Saves the adapter in PEFT format, loads it into a freshly built base model (identical
//!    outputs), merges it and times a merged forward against the base model's.
//!
//! ```text
//! cargo run --release --example finetune            # ~3 minutes on 2 cores
//! cargo run --release --example finetune -- --quick # a few seconds, tiny configuration
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{embedding, linear, Embedding, Linear, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lora::prelude::*;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------------
// The model: a GPT-style decoder. `#[lora]` on the attention is the only LoRA-specific line.
// ---------------------------------------------------------------------------------------------

/// Causal self-attention; LoRA on the query and value projections, as in the paper.
#[lora(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"])]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
}

/// Layer norm built from differentiable ops (candle-nn's fused kernel has no backward pass).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

fn layer_norm(d: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
    })
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

#[lora]
struct Block {
    ln_1: LayerNorm,
    #[lora(nested)]
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

#[lora]
struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    #[lora(nested)]
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct GptConfig {
    vocab: usize,
    ctx: usize,
    d_model: usize,
    n_layer: usize,
    n_head: usize,
}

/// How the q/v projections are built: frozen bases for LoRA, trainable ones for full fine-tuning.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Lora,
    Full,
}

impl Attention {
    fn new(cfg: &GptConfig, vb: VarBuilder, mode: Mode) -> Result<Self> {
        let d = cfg.d_model;
        let proj = |name: &str| -> Result<LoraLinear> {
            let l = linear(d, d, vb.pp(name))?;
            Ok(match mode {
                Mode::Lora => l.into(),
                Mode::Full => LoraLinear::new_unfrozen(l),
            })
        };
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: proj("v_proj")?,
            o_proj: linear(d, d, vb.pp("o_proj"))?,
            n_head: cfg.n_head,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.n_head;
        let heads = |y: Tensor| {
            y.reshape((b, t, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(mask)?;
        // `softmax_last_dim` and candle-nn's fused `LayerNorm` have no backward pass: use the
        // differentiable compositions.
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.o_proj.forward(&y)
    }
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder, mode: Mode) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            ln_1: layer_norm(d, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"), mode)?,
            ln_2: layer_norm(d, vb.pp("ln_2"))?,
            mlp: Mlp {
                c_fc: linear(d, 4 * d, vb.pp("mlp.c_fc"))?,
                c_proj: linear(4 * d, d, vb.pp("mlp.c_proj"))?,
            },
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask)?)?;
        let h = self.mlp.c_fc.forward(&self.ln_2.forward(&x)?)?.gelu()?;
        x + self.mlp.c_proj.forward(&h)?
    }
}

impl Gpt {
    fn new(cfg: &GptConfig, vb: VarBuilder, mode: Mode) -> Result<Self> {
        Ok(Self {
            wte: embedding(cfg.vocab, cfg.d_model, vb.pp("wte"))?,
            wpe: embedding(cfg.ctx, cfg.d_model, vb.pp("wpe"))?,
            h: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, vb.pp(format!("h.{i}")), mode))
                .collect::<Result<_>>()?,
            ln_f: layer_norm(cfg.d_model, vb.pp("ln_f"))?,
            lm_head: candle_nn::linear_no_bias(cfg.d_model, cfg.vocab, vb.pp("lm_head"))?,
        })
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]`.
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut x = self
            .wte
            .forward(ids)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        let mask = causal_mask(t, ids.device())?;
        for block in &self.h {
            x = block.forward(&x, &mask)?;
        }
        self.lm_head.forward(&self.ln_f.forward(&x)?)
    }
}

fn causal_mask(t: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// Builds the model on a VarMap filled from `weights` (or freshly initialised from `seed`).
fn build(cfg: &GptConfig, mode: Mode, weights: Option<&Path>, seed: u64) -> Result<(Gpt, VarMap)> {
    let dev = Device::Cpu;
    let mut varmap = VarMap::new();
    let model = Gpt::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        mode,
    )?;
    match weights {
        Some(path) => varmap
            .load(path)
            .with_context(|| format!("loading {}", path.display()))?,
        None => seeded_init(&varmap, seed)?,
    }
    Ok((model, varmap))
}

/// candle's CPU generator cannot be seeded: re-initialise every variable from a seeded one
/// (N(0, 0.02) for weights, zeros for biases, ones for layer-norm gains) so runs are reproducible.
fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.02)?;
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.contains("ln_") && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| rng.sample(normal)).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Data: a character-level vocabulary, a pre-training corpus and the E2E-style task.
// ---------------------------------------------------------------------------------------------

const PAD: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;
const CHARS: &str = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,[]=>-'";

fn encode(s: &str) -> Vec<u32> {
    s.chars()
        .map(|c| CHARS.find(c).map_or(3, |i| i as u32 + 4))
        .collect()
}

fn vocab_size() -> usize {
    CHARS.len() + 4
}

const NAMES: &[&str] = &[
    "Aromi",
    "Cotto",
    "Zizzi",
    "The Mill",
    "Giraffe",
    "Alimentum",
    "Loch Fyne",
    "Wildwood",
    "Fitzbillies",
    "The Phoenix",
    "Strada",
    "Green Man",
    "The Punter",
    "Clowns",
    "The Vaults",
    "Blue Spice",
    "The Eagle",
    "Browns",
    "The Wrestlers",
    "Taste of Cambridge",
    "The Golden Curry",
    "Bibimbap",
    "The Olive Grove",
    "The Rice Boat",
    "Cocum",
    "The Cricketers",
    "Midsummer",
    "The Dumpling Tree",
];
/// Names kept out of the adaptation's training split.
const HELD_OUT_NAMES: usize = 6;
const FOODS: &[&str] = &[
    "French", "Italian", "Chinese", "Indian", "Japanese", "English", "Thai", "Spanish",
];
const AREAS: &[&str] = &["riverside", "city centre"];
const PRICES: &[&str] = &["cheap", "moderately priced", "expensive"];

/// One E2E-style example: the meaning representation and its (deterministic) sentence.
fn e2e_example(rng: &mut StdRng, names: &[&str]) -> (String, String) {
    let name = *names.choose(rng).unwrap_or(&"Aromi");
    let food = *FOODS.choose(rng).unwrap_or(&"Thai");
    let area = *AREAS.choose(rng).unwrap_or(&"riverside");
    let price = rng
        .random_bool(0.5)
        .then(|| *PRICES.choose(rng).unwrap_or(&"cheap"));
    let family = rng.random_bool(0.5).then(|| rng.random_bool(0.5));
    let mut mr = format!("name[{name}] food[{food}] area[{area}]");
    let mut sentence = match price {
        Some(p) => {
            mr.push_str(&format!(" price[{p}]"));
            format!("{name} is a {p} {food} restaurant in the {area}.")
        }
        None => format!("{name} serves {food} food in the {area}."),
    };
    if let Some(f) = family {
        mr.push_str(&format!(" family[{}]", if f { "yes" } else { "no" }));
        sentence.push_str(if f {
            " It is family friendly."
        } else {
            " It is not family friendly."
        });
    }
    (mr, sentence)
}

/// Pre-training text: plain sentences, with names repeated inside a line so the model learns to
/// copy words it has not seen before.
fn corpus_line(rng: &mut StdRng) -> String {
    const WHO: &[&str] = &[
        "Anna",
        "Tom",
        "the farmer",
        "a child",
        "my friend",
        "the cook",
        "Lena",
        "Omar",
        "the teacher",
    ];
    const VERB: &[&str] = &[
        "likes", "sees", "makes", "finds", "wants", "sells", "eats", "paints", "visits",
    ];
    const WHAT: &[&str] = &[
        "bread",
        "a red boat",
        "the old house",
        "fresh fish",
        "green tea",
        "a small dog",
        "the city",
        "warm soup",
        "the river",
    ];
    const WHERE: &[&str] = &[
        "in the park",
        "near the river",
        "in the city centre",
        "at home",
        "by the sea",
        "in the morning",
    ];
    let word: String = (0..rng.random_range(4..9))
        .map(|i| {
            let c = rng.random_range(b'a'..=b'z') as char;
            if i == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let food = *FOODS.choose(rng).unwrap_or(&"Thai");
    let area = *AREAS.choose(rng).unwrap_or(&"riverside");
    let price = *PRICES.choose(rng).unwrap_or(&"cheap");
    match rng.random_range(0..9) {
        4 => format!(
            "{} likes {food} food, and the {area} is nice.",
            WHO.choose(rng).unwrap_or(&"Tom")
        ),
        // The sentences of the downstream task occur as plain text (with made-up names); the
        // meaning-representation format and the mapping are what adaptation has to learn.
        5 => e2e_example(rng, &[word.as_str()]).1,
        6 => format!("We ate in the {area}. The place is family friendly and not {price}."),
        7 => format!("{word} is a small restaurant in the {area}, and {word} is {price}."),
        // Bracketed key[value] notes, as in lists and tables on the web: the syntax of the
        // meaning representations, though never with the task's keys.
        8 => format!(
            "note[{word}] item[{}] => {word} has {}.",
            WHAT.choose(rng).unwrap_or(&"bread"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
        0 => format!(
            "{} {} {} {}.",
            WHO.choose(rng).unwrap_or(&"Tom"),
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread"),
            WHERE.choose(rng).unwrap_or(&"at home")
        ),
        1 => format!(
            "The place is called {word}. People go to {word} {}.",
            WHERE.choose(rng).unwrap_or(&"at home")
        ),
        2 => format!(
            "{word} {} {}, and {word} is happy.",
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
        _ => format!(
            "I met {word} {}. {word} {} {}.",
            WHERE.choose(rng).unwrap_or(&"at home"),
            VERB.choose(rng).unwrap_or(&"likes"),
            WHAT.choose(rng).unwrap_or(&"bread")
        ),
    }
}

/// A tokenised sequence and the index from which its tokens count in the loss.
struct Sequence {
    ids: Vec<u32>,
    loss_from: usize,
}

fn task_sequence(mr: &str, sentence: &str) -> Sequence {
    let mut ids = vec![BOS];
    ids.extend(encode(mr));
    ids.extend(encode(" => "));
    let loss_from = ids.len() - 1; // predict the first sentence token from the last prompt token
    ids.extend(encode(sentence));
    ids.push(EOS);
    Sequence { ids, loss_from }
}

fn corpus_sequence(line: &str) -> Sequence {
    let mut ids = vec![BOS];
    ids.extend(encode(line));
    ids.push(EOS);
    Sequence { ids, loss_from: 0 }
}

/// A padded batch: inputs `[b, t]`, targets `[b, t]`, loss mask `[b, t]`.
struct Batch {
    inputs: Tensor,
    targets: Tensor,
    mask: Tensor,
}

fn batch(seqs: &[&Sequence], ctx: usize) -> Result<Batch> {
    let t = seqs
        .iter()
        .map(|s| s.ids.len() - 1)
        .max()
        .unwrap_or(1)
        .min(ctx);
    let (mut inputs, mut targets, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for s in seqs {
        for i in 0..t {
            let has = i + 1 < s.ids.len();
            inputs.push(if i < s.ids.len() { s.ids[i] } else { PAD });
            targets.push(if has { s.ids[i + 1] } else { PAD });
            mask.push(if has && i >= s.loss_from { 1f32 } else { 0.0 });
        }
    }
    let b = seqs.len();
    let dev = Device::Cpu;
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), &dev)?,
        targets: Tensor::from_vec(targets, (b, t), &dev)?,
        mask: Tensor::from_vec(mask, (b, t), &dev)?,
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

// ---------------------------------------------------------------------------------------------
// Training and measurement.
// ---------------------------------------------------------------------------------------------

#[derive(Parser, Debug)]
#[allow(unreachable_pub)]
#[command(about = "Fine-tune a small GPT with #[lora] and with full fine-tuning, side by side")]
pub(crate) struct Args {
    /// Adaptation steps for each method (LoRA and full fine-tuning).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// LoRA rank (alpha = 2 * rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Seed for data, initialisation and sampling.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// A tiny configuration that runs in seconds (used by the test suite).
    #[arg(long)]
    quick: bool,
    /// Where the PEFT adapter is written (default: target/lora-example/adapter).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pre-train the base model again instead of using the cached one.
    #[arg(long)]
    retrain: bool,
    /// Pre-training steps.
    #[arg(long, default_value_t = 500)]
    pretrain_steps: usize,
}

struct Data {
    pretrain: Vec<Sequence>,
    train: Vec<Sequence>,
    valid: Vec<Sequence>,
    held_out: Vec<Sequence>,
}

fn make_data(seed: u64, quick: bool) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let (seen, unseen) = NAMES.split_at(NAMES.len() - HELD_OUT_NAMES);
    let n = if quick { 64 } else { 2000 };
    let pretrain = (0..n * 2)
        .map(|_| corpus_sequence(&corpus_line(&mut rng)))
        .collect();
    let mut task = |names: &[&str], k: usize| -> Vec<Sequence> {
        (0..k)
            .map(|_| {
                let (mr, s) = e2e_example(&mut rng, names);
                task_sequence(&mr, &s)
            })
            .collect()
    };
    let train = task(seen, n);
    let valid = task(seen, if quick { 16 } else { 128 });
    let held_out = task(unseen, if quick { 16 } else { 256 });
    Data {
        pretrain,
        train,
        valid,
        held_out,
    }
}

struct Trained {
    steps_per_s: f64,
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
#[allow(clippy::too_many_arguments)] // the knobs of a training loop, spelled out for the reader
fn train(
    model: &Gpt,
    vars: Vec<candle_core::Var>,
    seqs: &[Sequence],
    steps: usize,
    lr: f64,
    seed: u64,
    ctx: usize,
    batch_size: usize,
    label: &str,
) -> Result<Trained> {
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

/// Held-out loss, exact match and token accuracy.
fn evaluate(model: &Gpt, seqs: &[Sequence], ctx: usize) -> Result<(f32, f64, f64)> {
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
    Ok((loss / n as f32, exact as f64 / n as f64, acc / n as f64))
}

/// Peak resident memory since the last reset, in bytes (Linux; 0 elsewhere).
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets the peak RSS (Linux >= 4.0); harmless where unsupported.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median_secs(f: &mut dyn FnMut() -> Result<()>, runs: usize) -> Result<f64> {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn count_params(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

struct Row {
    name: &'static str,
    trainable: usize,
    total: usize,
    opt_bytes: u64,
    rss: u64,
    steps_per_s: f64,
    lr: f64,
    loss: f32,
    exact: f64,
    acc: f64,
}

/// What the run measured, for the test that runs the example.
#[allow(dead_code)]
pub(crate) struct Summary {
    pub(crate) base_loss: f32,
    pub(crate) lora_loss: f32,
    pub(crate) full_loss: f32,
    pub(crate) adapter_bytes: u64,
    pub(crate) full_bytes: u64,
}

fn main() -> Result<()> {
    run(Args::parse()).map(|_| ())
}

pub(crate) fn run(args: Args) -> Result<Summary> {
    ensure!(args.rank >= 1, "--rank must be at least 1");
    let (cfg, steps, pretrain_steps, batch_size) = if args.quick {
        (
            GptConfig {
                vocab: vocab_size(),
                ctx: 128,
                d_model: 32,
                n_layer: 1,
                n_head: 2,
            },
            args.steps.min(12),
            args.pretrain_steps.min(20),
            8,
        )
    } else {
        (
            GptConfig {
                vocab: vocab_size(),
                ctx: 128,
                d_model: 64,
                n_layer: 2,
                n_head: 4,
            },
            args.steps,
            args.pretrain_steps,
            12,
        )
    };
    let work = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("lora-example");
    std::fs::create_dir_all(&work)?;
    let out = args.out.clone().unwrap_or_else(|| work.join("adapter"));
    let data = make_data(args.seed, args.quick);
    println!("LoRA fine-tuning example: GPT d_model={} layers={} heads={} vocab={}; LoRA r={} alpha={} on q_proj, v_proj", cfg.d_model, cfg.n_layer, cfg.n_head, cfg.vocab, args.rank, 2 * args.rank);

    // 1. Pre-train the base model (cached).
    let base_path = work.join(format!(
        "base-d{}-l{}-s{}-p{}.safetensors",
        cfg.d_model, cfg.n_layer, args.seed, pretrain_steps
    ));
    if args.retrain || !base_path.exists() {
        let (model, varmap) = build(&cfg, Mode::Full, None, args.seed)?;
        train(
            &model,
            varmap.all_vars(),
            &data.pretrain,
            pretrain_steps,
            3e-3,
            args.seed,
            cfg.ctx,
            batch_size,
            "pre-training base",
        )?;
        varmap.save(&base_path)?;
    } else {
        println!(
            "using the cached base model {} (--retrain to pre-train again)",
            base_path.display()
        );
    }

    // 2. Base only.
    let mut rows = Vec::new();
    let (base, base_vars) = build(&cfg, Mode::Lora, Some(&base_path), args.seed)?;
    let total_params = count_params(&base_vars);
    let (l, e, a) = evaluate(&base, &data.held_out, cfg.ctx)?;
    rows.push(Row {
        name: "base model only",
        trainable: 0,
        total: total_params,
        opt_bytes: 0,
        rss: 0,
        steps_per_s: 0.0,
        lr: 0.0,
        loss: l,
        exact: e,
        acc: a,
    });

    // 3. The same adaptation with LoRA and with full fine-tuning: same steps; each searches two
    //    learning rates on a quarter of the steps, scored on a validation split.
    let layer_config = LayerConfig::new(args.rank, 2.0 * args.rank as f64);
    let probe = (steps / 4).max(1);
    let mut lora_model = None;
    for (mode, name, lrs) in [
        (Mode::Lora, "LoRA", [1e-1, 3e-2]),
        (Mode::Full, "full fine-tuning", [3e-3, 1e-3]),
    ] {
        let setup = |seed: u64| -> Result<(Gpt, VarMap, VarMap)> {
            let (mut model, vars) = build(&cfg, mode, Some(&base_path), args.seed)?;
            let adapters = VarMap::new();
            if mode == Mode::Lora {
                model.init_adapter_with(
                    &adapters,
                    &InitOptions::default()
                        .with_config(layer_config)
                        .with_seed(seed),
                )?;
            }
            Ok((model, vars, adapters))
        };
        let trainable = |m: &Gpt, vars: &VarMap| {
            if mode == Mode::Lora {
                m.trainable_vars()
            } else {
                vars.all_vars()
            }
        };
        let mut best = (f32::INFINITY, lrs[0]);
        for lr in lrs {
            let (m, vars, _) = setup(args.seed)?;
            train(
                &m,
                trainable(&m, &vars),
                &data.train,
                probe,
                lr,
                args.seed + 1,
                cfg.ctx,
                batch_size,
                &format!("{name} lr {lr:e}"),
            )?;
            let (vl, _, _) = evaluate(&m, &data.valid, cfg.ctx)?;
            if vl < best.0 {
                best = (vl, lr);
            }
        }
        let (m, vars, _) = setup(args.seed)?;
        let params = trainable(&m, &vars);
        let n_trainable: usize = params.iter().map(|v| v.elem_count()).sum();
        reset_peak_rss();
        let t = train(
            &m,
            params,
            &data.train,
            steps,
            best.1,
            args.seed + 2,
            cfg.ctx,
            batch_size,
            name,
        )?;
        let rss = peak_rss();
        let (l, e, a) = evaluate(&m, &data.held_out, cfg.ctx)?;
        let total = if mode == Mode::Lora {
            total_params + n_trainable
        } else {
            total_params
        };
        // AdamW keeps two f32 moments per trainable parameter.
        rows.push(Row {
            name,
            trainable: n_trainable,
            total,
            opt_bytes: 2 * 4 * n_trainable as u64,
            rss,
            steps_per_s: t.steps_per_s,
            lr: best.1,
            loss: l,
            exact: e,
            acc: a,
        });
        if mode == Mode::Lora {
            lora_model = Some(m);
        } else {
            vars.save(work.join("full-finetune.safetensors"))?;
        }
    }
    let mut lora_model = lora_model.context("LoRA model missing")?;

    // 4. The table.
    println!();
    println!("| held-out: {} MRs with unseen names | trainable params | % of all | optimizer state | peak RSS | steps/s | lr | loss | exact match | token acc |", data.held_out.len());
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let na = r.trainable == 0;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {:.1}% |",
            r.name,
            r.trainable,
            if na {
                "0%".into()
            } else {
                format!("{:.2}%", 100.0 * r.trainable as f64 / r.total as f64)
            },
            human_bytes(r.opt_bytes),
            if na { "-".into() } else { human_bytes(r.rss) },
            if na {
                "-".into()
            } else {
                format!("{:.1}", r.steps_per_s)
            },
            if na {
                "-".into()
            } else {
                format!("{:e}", r.lr)
            },
            r.loss,
            100.0 * r.exact,
            100.0 * r.acc
        );
    }
    let counts = lora_model.trainable_parameters();
    println!(
        "{}",
        counts.with_frozen(total_params - (counts.total - counts.trainable))
    );

    // 5. Save in PEFT format, load into a fresh base, compare.
    lora_model.save_adapter(&out)?;
    let adapter_size = std::fs::metadata(out.join("adapter_model.safetensors"))?.len();
    let full_size = std::fs::metadata(work.join("full-finetune.safetensors"))?.len();
    println!(
        "adapter: {} ({}) vs full checkpoint {} ({}): {:.1}x smaller",
        out.join("adapter_model.safetensors").display(),
        human_bytes(adapter_size),
        work.join("full-finetune.safetensors").display(),
        human_bytes(full_size),
        full_size as f64 / adapter_size as f64
    );
    let (mut fresh, _) = build(&cfg, Mode::Lora, Some(&base_path), args.seed)?;
    fresh.load_adapter(&out)?;
    let refs: Vec<&Sequence> = data.held_out.iter().take(16).collect();
    let probe_batch = batch(&refs, cfg.ctx)?;
    let y_trained = lora_model.forward(&probe_batch.inputs)?;
    let y_loaded = fresh.forward(&probe_batch.inputs)?;
    let identical =
        y_trained.flatten_all()?.to_vec1::<f32>()? == y_loaded.flatten_all()?.to_vec1::<f32>()?;
    ensure!(
        identical,
        "the reloaded adapter must give identical outputs"
    );
    println!("reloaded the adapter into a freshly built base model: outputs bit-identical");

    // 6. Merge: same output, and a forward costs what the base model's does.
    lora_model.merge()?;
    let y_merged = lora_model.forward(&probe_batch.inputs)?;
    let diff = (&y_merged - &y_trained)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = y_trained.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let runs = if args.quick { 5 } else { 41 };
    let x = &probe_batch.inputs;
    let (mut t_base, mut t_merged, mut t_unmerged) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        // Interleaved rounds, so drift on a shared machine hits all three alike.
        t_base.push(median_secs(
            &mut || {
                base.forward(x)?;
                Ok(())
            },
            runs,
        )?);
        t_merged.push(median_secs(
            &mut || {
                lora_model.forward(x)?;
                Ok(())
            },
            runs,
        )?);
        t_unmerged.push(median_secs(
            &mut || {
                fresh.forward(x)?;
                Ok(())
            },
            runs,
        )?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (tb, tm, tu) = (med(&mut t_base), med(&mut t_merged), med(&mut t_unmerged));
    println!("merged: max |merged - unmerged| = {diff:.2e} (outputs up to {scale:.1})");
    println!(
        "forward of 16 sequences, median of {runs} x 3: base {:.2} ms, merged {:.2} ms ({:.3}x base), unmerged LoRA {:.2} ms ({:.3}x base)",
        tb * 1e3, tm * 1e3, tm / tb, tu * 1e3, tu / tb
    );
    Ok(Summary {
        base_loss: rows[0].loss,
        lora_loss: rows[1].loss,
        full_loss: rows[2].loss,
        adapter_bytes: adapter_size,
        full_bytes: full_size,
    })
}
