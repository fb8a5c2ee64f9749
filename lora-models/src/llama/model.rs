//! The Llama-family decoder, written with `#[lora]`: field names are transformers' module paths
//! (`model.layers.0.self_attn.q_proj`, ..., `lm_head`), so PEFT adapters load by name.
//!
//! Every projection and the LM head are `adaptable`: LoRA-capable with no default adapter. A
//! layer without an adapter computes exactly its base. Which layers get adapters is chosen at
//! run time, e.g. from a PEFT config:
//!
//! ```no_run
//! # use lora_models::llama::LlamaForCausalLM;
//! use lora_runtime::{InitOptions, LoraConfig, LoraModelExt};
//! # fn f(model: &mut LlamaForCausalLM) -> Result<(), Box<dyn std::error::Error>> {
//! let config = LoraConfig::from_json(r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}"#)?;
//! model.init_adapter_with(&candle_nn::VarMap::new(), &InitOptions::default().with_peft_config(config))?;
//! # Ok(()) }
//! ```

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use lora_macros::lora;
use lora_runtime::ops::{causal_attention, split_heads};
use lora_runtime::train::Checkpointing;
use lora_runtime::{LoraLinear, QuantizedWeight};

use super::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// Grouped-query self-attention with rotary position embeddings.
#[lora(crate = "::lora_runtime", adaptable = ["q_proj", "k_proj", "v_proj", "o_proj"])]
#[derive(Debug, Clone)]
pub struct Attention {
    /// `q_proj`, `[heads * head_dim, hidden]`.
    pub q_proj: Linear,
    /// `k_proj`, `[kv_heads * head_dim, hidden]`.
    pub k_proj: Linear,
    /// `v_proj`, `[kv_heads * head_dim, hidden]`.
    pub v_proj: Linear,
    /// `o_proj`, `[hidden, heads * head_dim]`.
    pub o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[lora(crate = "::lora_runtime", adaptable = ["gate_proj", "up_proj", "down_proj"])]
#[derive(Debug, Clone)]
pub struct Mlp {
    /// `gate_proj`.
    pub gate_proj: Linear,
    /// `up_proj`.
    pub up_proj: Linear,
    /// `down_proj`.
    pub down_proj: Linear,
}

/// One decoder layer: pre-norm attention and MLP, each with a residual connection.
#[lora(crate = "::lora_runtime")]
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// `self_attn`.
    #[lora(nested)]
    pub self_attn: Attention,
    /// `mlp`.
    #[lora(nested)]
    pub mlp: Mlp,
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
}

/// The token embedding table: dense, or as a quantized GGUF stores it (a model loaded with
/// [`Precision::Quantized`](super::Precision::Quantized)). It never trains but in full
/// fine-tuning, which needs it dense.
#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// A float table.
    Dense(Embedding),
    /// GGUF blocks, rows dequantized as they are looked up.
    Quantized(QuantizedWeight),
}

impl TokenEmbedding {
    /// The dense table, if it is one.
    pub fn dense(&self) -> Option<&Embedding> {
        match self {
            Self::Dense(e) => Some(e),
            Self::Quantized(_) => None,
        }
    }
    /// The device the table lives on.
    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(e) => e.embeddings().device(),
            Self::Quantized(q) => q.device(),
        }
    }
}

impl Module for TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Quantized(q) => q.embedding(ids),
        }
    }
}

/// The decoder stack (`model.` in transformers' paths).
#[lora(crate = "::lora_runtime")]
#[derive(Debug, Clone)]
pub struct LlamaModel {
    /// `embed_tokens`.
    pub embed_tokens: TokenEmbedding,
    /// `layers`.
    #[lora(nested)]
    pub layers: Vec<DecoderLayer>,
    /// `norm`.
    pub norm: RmsNorm,
    /// The inverse rotary frequencies, f32 `[head_dim / 2]`.
    inv_freq: Tensor,
    /// Query heads per key/value head.
    groups: usize,
}

/// A Llama-family causal language model (Llama 1-3, SmolLM, Qwen2): `model` plus `lm_head`.
#[lora(crate = "::lora_runtime", adaptable = ["lm_head"])]
#[derive(Debug, Clone)]
pub struct LlamaForCausalLM {
    /// `model`.
    #[lora(nested)]
    pub model: LlamaModel,
    /// `lm_head` (sharing the embedding matrix when `tie_word_embeddings`).
    pub lm_head: Linear,
    config: LlamaConfig,
    /// Set for training with activation checkpointing.
    checkpointing: Option<Checkpointing>,
}

/// The key/value cache of one sequence batch: what generation reuses from step to step. A model
/// is shared (`&self`); each generation owns its cache.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
}

impl Cache {
    /// An empty cache for `config`'s layers.
    pub fn new(config: &LlamaConfig) -> Self {
        Self {
            layers: vec![None; config.num_hidden_layers],
            len: 0,
        }
    }
    /// The number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Refuses a cache made for a model with another number of layers.
    pub(super) fn check_fits(&self, layers: usize) -> Result<()> {
        if self.layers.len() != layers {
            return Err(ModelError::Input(format!(
                "the cache has {} layers, the model {layers}",
                self.layers.len()
            )));
        }
        Ok(())
    }
}

impl Attention {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, kv, d, hidden) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.hidden_size,
        );
        let qkv_bias = config.attention_bias;
        // Llama's `attention_bias` covers o_proj too; Qwen2's o_proj never has one.
        let o_bias = config.attention_bias && config.model_type != "qwen2";
        Ok(Self {
            q_proj: candle_nn::linear_b(hidden, h * d, qkv_bias, vb.pp("q_proj"))?.into(),
            k_proj: candle_nn::linear_b(hidden, kv * d, qkv_bias, vb.pp("k_proj"))?.into(),
            v_proj: candle_nn::linear_b(hidden, kv * d, qkv_bias, vb.pp("v_proj"))?.into(),
            o_proj: candle_nn::linear_b(h * d, hidden, o_bias, vb.pp("o_proj"))?.into(),
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rope = Some((&rope.0, &rope.1));
        let q = split_heads(&self.q_proj.forward(x)?, h, rope)?;
        let k = split_heads(&self.k_proj.forward(x)?, kv, rope)?;
        let v = split_heads(&self.v_proj.forward(x)?, kv, None)?;
        let y = attend(&q, k, v, mask, cache, (h, kv, d))?;
        self.o_proj.forward(&y)
    }
}

/// Scaled dot-product attention of rotated `q [b, h, t, d]` over the new `k`, `v`
/// `[b, kv, t, d]` appended to `cache`; returns `[b, t, h * d]`, the input of `o_proj`. With
/// no cache, causal over the new positions ([`causal_attention`], fused on the CPU); after
/// cached positions, causal through `mask` (`[groups * t, past + t]`, see `causal_mask`; `None`
/// for one new position). Shared by the model's forward and the per-sequence decoding of
/// `batch.rs`.
pub(super) fn attend(
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    mask: Option<&Tensor>,
    cache: &mut Option<(Tensor, Tensor)>,
    (h, kv, d): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let Some((k0, v0)) = cache.take() else {
        *cache = Some((k.clone(), v.clone()));
        return causal_attention(q, &k, &v);
    };
    let (k, v) = (Tensor::cat(&[k0, k], 2)?, Tensor::cat(&[v0, v], 2)?);
    *cache = Some((k.clone(), v.clone()));
    // Grouped-query attention without repeating keys and values: the `n` query heads that
    // share a key/value head are stacked along the positions, `[b, kv, n * t, d]` (query
    // head `g * n + j` uses key/value head `g`, as transformers' `repeat_kv` pairs them).
    // The scale goes on `q` (`t x d` values rather than `t x T` scores).
    let n = h / kv;
    let q = (q * (1.0 / (d as f64).sqrt()))?.reshape((b, kv, n * t, d))?;
    let scores = q.matmul(&k.t()?)?; // [b, kv, n * t, T]
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?, // [n * t, T]
        None => scores,
    };
    let dtype = scores.dtype();
    // `lora_runtime::ops`: candle's fused kernels, with a backward when training.
    let probs =
        lora_runtime::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    lora_runtime::ops::merge_heads(&probs.matmul(&v)?, h)
}

impl Mlp {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (hidden, inter, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Self {
            gate_proj: candle_nn::linear_b(hidden, inter, bias, vb.pp("gate_proj"))?.into(),
            up_proj: candle_nn::linear_b(hidden, inter, bias, vb.pp("up_proj"))?.into(),
            down_proj: candle_nn::linear_b(inter, hidden, bias, vb.pp("down_proj"))?.into(),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let plain = (
            self.gate_proj.plain_weight(),
            self.up_proj.plain_weight(),
            self.down_proj.plain_weight(),
        );
        if let (true, (Some(gate), Some(up), Some(down))) = (x.track_op(), plain) {
            // Training with no adapter on the MLP: one op with its own backward.
            return lora_runtime::ops::swiglu_mlp(x, gate, up, down);
        }
        let product =
            lora_runtime::ops::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&product)
    }
}

impl DecoderLayer {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(config, vb.pp("self_attn"))?,
            mlp: Mlp::new(config, vb.pp("mlp"))?,
            input_layernorm: candle_nn::rms_norm(hidden, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                hidden,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        // `norm`, not `RmsNorm::forward`: candle's fused kernel has no backward and would cut
        // the gradient of everything below this layer.
        let h =
            (x + self
                .self_attn
                .forward(&norm(&self.input_layernorm, x)?, rope, mask, cache)?)?;
        &h + self
            .mlp
            .forward(&norm(&self.post_attention_layernorm, &h)?)?
    }
}

/// RMSNorm through `lora_runtime::ops` (candle's `RmsNorm` has no backward).
pub(super) fn norm(layer: &RmsNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    lora_runtime::ops::rms_norm(x, layer.weight(), layer.eps())
}

/// The causal mask for `t` new positions after `past` cached ones: 0 where a query may look,
/// -inf above the diagonal, `[t, past + t]`, repeated `groups` times along the rows (the query
/// heads sharing a key/value head are stacked that way, see `Attention::forward`):
/// `[groups * t, past + t]`.
pub(super) fn causal_mask(
    t: usize,
    past: usize,
    groups: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = past + t;
    let values: Vec<f32> = (0..groups * t)
        .flat_map(|row| {
            let i = row % t;
            (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Tensor::from_vec(values, (groups * t, total), device)?.to_dtype(dtype)
}

impl LlamaModel {
    fn new(config: &LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let embed_tokens =
            candle_nn::embedding(config.vocab_size, config.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, vb.pp("layers").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = candle_nn::rms_norm(config.hidden_size, config.rms_norm_eps, vb.pp("norm"))?;
        let inv_freq = config.inv_freq();
        let n = inv_freq.len();
        Ok(Self {
            embed_tokens: TokenEmbedding::Dense(embed_tokens),
            layers,
            norm,
            inv_freq: Tensor::from_vec(inv_freq, n, vb.device())?,
            groups: config.num_attention_heads / config.num_key_value_heads.max(1),
        })
    }

    /// `(cos, sin)` `[t, head_dim / 2]` for positions `past .. past + t`, in `dtype`.
    fn rope(&self, past: usize, t: usize, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        let positions: Vec<usize> = (past..past + t).collect();
        self.rope_at(&positions, dtype)
    }

    /// `(cos, sin)` `[n, head_dim / 2]` at any `positions` (a decoding step's rows each have
    /// their own), in `dtype`.
    pub(super) fn rope_at(
        &self,
        positions: &[usize],
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let n = positions.len();
        let positions: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (n, 1), device)?;
        let freqs = positions.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// The final hidden states `[b, t, hidden]` for token ids `[b, t]`, after `cache`'s
    /// positions; the cache is extended by `t`.
    ///
    /// # Errors
    /// Shape errors from candle; a cache of another model.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        cache.check_fits(self.layers.len())?;
        let past = cache.len;
        let mut x = self.embed_tokens.forward(ids)?;
        let dtype = x.dtype();
        let rope = self.rope(past, t, dtype)?;
        let mask = if t > 1 && past > 0 {
            Some(causal_mask(t, past, self.groups, dtype, x.device())?)
        } else {
            None
        };
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &rope, mask.as_ref(), kv)?;
        }
        cache.len += t;
        Ok(norm(&self.norm, &x)?)
    }

    /// [`forward`](Self::forward) from position 0 without a cache, each decoder layer
    /// checkpointed (see [`Checkpointing`]): for training with less memory.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_checkpointed(&self, ids: &Tensor, ck: &Checkpointing) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut x = self.embed_tokens.forward(ids)?;
        let dtype = x.dtype();
        let rope = self.rope(0, t, dtype)?;
        for layer in &self.layers {
            let (layer, rope) = (layer.clone(), rope.clone());
            x = ck.run(&x, move |x| layer.forward(x, &rope, None, &mut None))?;
        }
        Ok(norm(&self.norm, &x)?)
    }
}

impl LlamaForCausalLM {
    /// Builds the model from weights named as transformers names them (`model.embed_tokens.weight`,
    /// `model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight` unless tied).
    ///
    /// # Errors
    /// A candle error naming a missing tensor or a wrong shape.
    pub fn new(config: LlamaConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let model = LlamaModel::new(&config, vb.pp("model"))?;
        let lm_head =
            if let (true, Some(table)) = (config.tie_word_embeddings, model.embed_tokens.dense()) {
                Linear::new(table.embeddings().clone(), None)
            } else {
                candle_nn::linear_no_bias(config.hidden_size, config.vocab_size, vb.pp("lm_head"))?
            };
        Ok(Self {
            model,
            lm_head: LoraLinear::from(lm_head),
            config,
            checkpointing: None,
        })
    }

    /// Checkpoints every decoder layer in [`CausalLm::hidden_states`](crate::sft::CausalLm)
    /// (training; `None` turns it off). Generation and [`forward`](Self::forward) are unchanged.
    pub fn set_gradient_checkpointing(&mut self, ck: Option<Checkpointing>) {
        self.checkpointing = ck;
    }

    /// The checkpointing set by [`set_gradient_checkpointing`](Self::set_gradient_checkpointing).
    pub fn gradient_checkpointing(&self) -> Option<&Checkpointing> {
        self.checkpointing.as_ref()
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// A fresh key/value cache for this model.
    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Logits `[b, t, vocab]` for every position of `ids [b, t]`, after `cache`'s positions.
    ///
    /// # Errors
    /// Shape errors; token ids outside the vocabulary.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let hidden = self.model.forward(ids, cache)?;
        Ok(self.lm_head.forward(&hidden)?)
    }

    /// Logits `[b, vocab]` of the last position only (the LM head on one position): what
    /// generation needs.
    ///
    /// # Errors
    /// As [`forward`](Self::forward).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let hidden = self.model.forward(ids, cache)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?)
    }
}
