//! Decoding many sequences at once, each at its own position: what a server's continuous batching
//! needs. Every sequence owns a [`SeqCache`]; [`LlamaForCausalLM::prefill`] runs one sequence's
//! prompt, [`LlamaForCausalLM::decode_step`] then advances all of them by one token in one pass.
//!
//! In a decoding step the projections, MLPs and the LM head run once over the `[b, 1, hidden]`
//! batch (so a mixed-adapter assignment set with `set_batch_adapters` routes row `i` through its
//! sequence's adapter); RoPE rotates each row at its own position; attention runs per row over
//! that row's cached keys and values, with the same shapes and operations as a lone sequence's
//! step, so no padding and no mask are needed.
//!
//! ```
//! use candle_core::{DType, Device};
//! use lora_models::llama::load_llama;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llm/tiny-llama");
//! let model = load_llama(dir.as_ref(), DType::F32, &Device::Cpu)?;
//! let (mut a, mut b) = (model.new_cache(), model.new_cache());
//! model.prefill(&[1, 2, 3], &mut a)?;
//! model.prefill(&[4, 5], &mut b)?;
//! let logits = model.decode_step(&[6, 7], &mut [&mut a, &mut b])?; // [2, vocab]
//! assert_eq!((a.len(), b.len()), (4, 3));
//! assert_eq!(logits.dims(), &[2, model.config().vocab_size]);
//! # Ok::<(), lora_models::ModelError>(())
//! ```

use candle_core::{Module, Tensor};

use super::model::{attend, causal_mask, norm, Attention, Cache, LlamaForCausalLM};

use crate::error::{ModelError, Result};

/// The key/value cache of one sequence for [`LlamaForCausalLM::prefill`] and
/// [`LlamaForCausalLM::decode_step`]: the model's own [`Cache`], holding one sequence.
pub type SeqCache = Cache;

/// The shapes of the attention, from the config (the layer's own fields are private).
#[derive(Debug, Clone, Copy)]
struct Heads {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Heads {
    /// `(heads, kv_heads, head_dim)`.
    fn dims(self) -> (usize, usize, usize) {
        (self.heads, self.kv_heads, self.head_dim)
    }
}

/// The projections of `x [b, t, hidden]` split into heads: `[b, n, t, d]`.
fn project(layer: &impl Module, x: &Tensor, n: usize, d: usize) -> candle_core::Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    layer
        .forward(x)?
        .reshape((b, t, n, d))?
        .transpose(1, 2)?
        .contiguous()
}

impl LlamaForCausalLM {
    fn heads(&self) -> Heads {
        let c = self.config();
        Heads {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads.max(1),
            head_dim: c.head_dim,
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        Ok(())
    }

    /// Runs the tokens `ids` of one sequence after its cached positions and returns the logits
    /// of the last one, `[1, vocab]`; `cache` grows by `ids.len()`. With a mixed-adapter
    /// assignment set, it must have one row.
    ///
    /// # Errors
    /// Empty `ids`, ids outside the vocabulary, a cache of another model, candle errors.
    pub fn prefill(&self, ids: &[u32], cache: &mut SeqCache) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(ModelError::Input("nothing to prefill".into()));
        }
        self.check_ids(ids)?;
        cache.check_fits(self.model.layers.len())?;
        let shape = self.heads();
        let (t, past) = (ids.len(), cache.len);
        let device = self.model.embed_tokens.device().clone();
        let mut x = self
            .model
            .embed_tokens
            .forward(&Tensor::new(ids, &device)?.unsqueeze(0)?)?;
        let dtype = x.dtype();
        let positions: Vec<usize> = (past..past + t).collect();
        let (cos, sin) = self.model.rope_at(&positions, dtype)?;
        let groups = shape.heads / shape.kv_heads;
        let mask = if t > 1 && past > 0 {
            Some(causal_mask(t, past, groups, dtype, &device)?)
        } else {
            None
        };
        for (layer, kv) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            let a = &layer.self_attn;
            let h = norm(&layer.input_layernorm, &x)?;
            let q = project(&a.q_proj, &h, shape.heads, shape.head_dim)?;
            let k = project(&a.k_proj, &h, shape.kv_heads, shape.head_dim)?;
            let v = project(&a.v_proj, &h, shape.kv_heads, shape.head_dim)?;
            let q = lora_runtime::ops::rope(&q, &cos, &sin)?;
            let k = lora_runtime::ops::rope(&k, &cos, &sin)?;
            let y = attend(&q, k, v, mask.as_ref(), kv, shape.dims())?;
            x = (x + a.o_proj.forward(&y)?)?;
            x = (&x
                + layer
                    .mlp
                    .forward(&norm(&layer.post_attention_layernorm, &x)?)?)?;
        }
        cache.len += t;
        let last = norm(&self.model.norm, &x)?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?;
        Ok(self.lm_head.forward(&last)?)
    }

    /// One decoding step of `b` sequences: `tokens[i]` is the next token of the sequence whose
    /// cache is `caches[i]`, at that cache's position. Returns the logits `[b, vocab]`; each
    /// cache grows by one. With a mixed-adapter assignment set, it must have `b` rows.
    ///
    /// # Errors
    /// No tokens, `tokens` and `caches` of different lengths, ids outside the vocabulary, a
    /// cache of another model, candle errors.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut SeqCache]) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 || caches.len() != b {
            return Err(ModelError::Input(format!(
                "a decoding step needs one token per cache, got {b} tokens and {} caches",
                caches.len()
            )));
        }
        self.check_ids(tokens)?;
        for cache in caches.iter() {
            cache.check_fits(self.model.layers.len())?;
        }
        let shape = self.heads();
        let (hd, d) = (shape.heads, shape.head_dim);
        let device = self.model.embed_tokens.device().clone();
        let mut x = self
            .model
            .embed_tokens
            .forward(&Tensor::new(tokens, &device)?.unsqueeze(1)?)?; // [b, 1, hidden]
        let dtype = x.dtype();
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        // `[b, d / 2]`. Rows at their own positions: the batch goes along the time axis,
        // `[1, n, b, d]`, where the rotation table has one position per row.
        let (cos, sin) = self.model.rope_at(&positions, dtype)?;
        let rotate = |y: &Tensor| -> candle_core::Result<Tensor> {
            let y = y.transpose(0, 2)?.contiguous()?;
            lora_runtime::ops::rope(&y, &cos, &sin)?
                .transpose(0, 2)?
                .contiguous()
        };
        for (l, layer) in self.model.layers.iter().enumerate() {
            let a: &Attention = &layer.self_attn;
            let h = norm(&layer.input_layernorm, &x)?;
            let q = rotate(&project(&a.q_proj, &h, hd, d)?)?; // [b, h, 1, d]
            let k = rotate(&project(&a.k_proj, &h, shape.kv_heads, d)?)?;
            let v = project(&a.v_proj, &h, shape.kv_heads, d)?;
            let mut rows = Vec::with_capacity(b);
            for (i, cache) in caches.iter_mut().enumerate() {
                let kv = cache
                    .layers
                    .get_mut(l)
                    .ok_or_else(|| ModelError::Input(format!("the cache has no layer {l}")))?;
                rows.push(attend(
                    &q.narrow(0, i, 1)?,
                    k.narrow(0, i, 1)?,
                    v.narrow(0, i, 1)?,
                    None,
                    kv,
                    shape.dims(),
                )?);
            }
            let y = Tensor::cat(&rows, 0)?; // [b, 1, h * d]
            x = (x + a.o_proj.forward(&y)?)?;
            x = (&x
                + layer
                    .mlp
                    .forward(&norm(&layer.post_attention_layernorm, &x)?)?)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let last = norm(&self.model.norm, &x)?.squeeze(1)?;
        Ok(self.lm_head.forward(&last)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::load_llama;
    use candle_core::{DType, Device};

    fn tiny() -> LlamaForCausalLM {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/llm/tiny-llama"
        );
        load_llama(dir.as_ref(), DType::F32, &Device::Cpu).unwrap()
    }

    /// Sequences of different lengths decoded together give each the logits it gets alone.
    #[test]
    fn a_batched_step_matches_each_sequence_alone() {
        let model = tiny();
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[7], &[9, 8, 7]];
        let mut caches: Vec<SeqCache> = prompts.iter().map(|_| model.new_cache()).collect();
        for (p, c) in prompts.iter().zip(caches.iter_mut()) {
            model.prefill(p, c).unwrap();
        }
        let next = [11u32, 12, 13];
        let mut refs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        let batched: Vec<Vec<f32>> = model
            .decode_step(&next, &mut refs)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut ids = p.to_vec();
            ids.push(next[i]);
            let mut cache = model.new_cache();
            let alone: Vec<f32> = model
                .forward_last(
                    &Tensor::new(ids.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    &mut cache,
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let diff = alone
                .iter()
                .zip(&batched[i])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "row {i}: {diff}");
        }
        assert_eq!(caches[1].len(), 2);
    }

    #[test]
    fn prefill_then_steps_match_the_model_cache() {
        let model = tiny();
        let mut seq = model.new_cache();
        let mut cache = model.new_cache();
        let a = model.prefill(&[3, 1, 4], &mut seq).unwrap();
        let b = model
            .forward_last(
                &Tensor::new(&[[3u32, 1, 4]], &Device::Cpu).unwrap(),
                &mut cache,
            )
            .unwrap();
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let a = model.decode_step(&[5], &mut [&mut seq]).unwrap();
        let b = model
            .forward_last(&Tensor::new(&[[5u32]], &Device::Cpu).unwrap(), &mut cache)
            .unwrap();
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(model.decode_step(&[5, 6], &mut [&mut seq]).is_err());
    }
}
