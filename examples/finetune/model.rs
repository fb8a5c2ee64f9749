//! The model: a GPT-style decoder. `#[lora]` on the attention is the only LoRA-specific line.
//!
//! `benches/lora.rs` includes this file too, so the training-step benchmark measures this model.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder, VarMap};
use lora::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Causal self-attention; LoRA on the query and value projections, as in the paper. The other
/// linear layers are `LoraLinear`s without adapter too: frozen (no weight gradient) when
/// training LoRA, trainable for full fine-tuning.
#[lora(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"])]
struct Attention {
    q_proj: Linear,
    k_proj: LoraLinear,
    v_proj: Linear,
    o_proj: LoraLinear,
    n_head: usize,
}

/// Layer norm through `lora::ops::layer_norm`: a fused kernel with a backward pass
/// (candle-nn's fused kernel has none).
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
        lora::ops::layer_norm(x, &self.weight, &self.bias, 1e-5)
    }
}

struct Mlp {
    c_fc: LoraLinear,
    c_proj: LoraLinear,
}

#[lora]
struct Block {
    ln_1: LayerNorm,
    #[lora(nested)]
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

/// The decoder: token and position embeddings, `n_layer` blocks, a final norm and the LM head.
#[lora]
pub(crate) struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    #[lora(nested)]
    h: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: LoraLinear,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GptConfig {
    pub(crate) vocab: usize,
    pub(crate) ctx: usize,
    pub(crate) d_model: usize,
    pub(crate) n_layer: usize,
    pub(crate) n_head: usize,
}

/// How the q/v projections are built: frozen bases for LoRA, trainable ones for full fine-tuning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mode {
    Lora,
    Full,
}

/// A linear layer: frozen for LoRA training, trainable for full fine-tuning.
fn layer(l: Linear, mode: Mode) -> LoraLinear {
    match mode {
        Mode::Lora => l.into(),
        Mode::Full => LoraLinear::new_unfrozen(l),
    }
}

impl Attention {
    fn new(cfg: &GptConfig, vb: VarBuilder, mode: Mode) -> Result<Self> {
        let d = cfg.d_model;
        let proj =
            |name: &str| -> Result<LoraLinear> { Ok(layer(linear(d, d, vb.pp(name))?, mode)) };
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            o_proj: proj("o_proj")?,
            n_head: cfg.n_head,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // `lora::ops`: fused layout changes and causal attention with a backward pass.
        let heads = |y: Tensor| lora::ops::split_heads(&y, self.n_head, None);
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        self.o_proj
            .forward(&lora::ops::causal_attention(&q, &k, &v)?)
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
                c_fc: layer(linear(d, 4 * d, vb.pp("mlp.c_fc"))?, mode),
                c_proj: layer(linear(4 * d, d, vb.pp("mlp.c_proj"))?, mode),
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?)?)?;
        let h = lora::ops::gelu(&self.mlp.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        x + self.mlp.c_proj.forward(&h)?
    }
}

impl Gpt {
    /// Builds the model on `vb` (PyTorch's GPT-2 names: `h.0.attn.q_proj`, ...).
    pub(crate) fn new(cfg: &GptConfig, vb: VarBuilder, mode: Mode) -> Result<Self> {
        Ok(Self {
            wte: embedding(cfg.vocab, cfg.d_model, vb.pp("wte"))?,
            wpe: embedding(cfg.ctx, cfg.d_model, vb.pp("wpe"))?,
            h: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, vb.pp(format!("h.{i}")), mode))
                .collect::<Result<_>>()?,
            ln_f: layer_norm(cfg.d_model, vb.pp("ln_f"))?,
            lm_head: layer(
                candle_nn::linear_no_bias(cfg.d_model, cfg.vocab, vb.pp("lm_head"))?,
                mode,
            ),
        })
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]`.
    pub(crate) fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut x = self
            .wte
            .forward(ids)?
            .broadcast_add(&self.wpe.forward(&pos)?)?;
        for block in &self.h {
            x = block.forward(&x)?;
        }
        self.lm_head.forward(&self.ln_f.forward(&x)?)
    }
}

/// Builds the model on a VarMap filled from `weights` (or freshly initialised from `seed`).
pub(crate) fn build(
    cfg: &GptConfig,
    mode: Mode,
    weights: Option<&Path>,
    seed: u64,
) -> Result<(Gpt, VarMap)> {
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

/// Adds a fresh adapter to every LoRA target, with `config` instead of the `#[lora]` attribute's
/// rank and alpha and factors drawn from `seed`; the factors are created in `adapters`.
pub(crate) fn init_seeded_adapter(
    model: &mut Gpt,
    adapters: &VarMap,
    config: &LayerConfig,
    seed: u64,
) -> Result<()> {
    let options = InitOptions::default().with_config(*config).with_seed(seed);
    model.init_adapter_with(adapters, &options)?;
    Ok(())
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
