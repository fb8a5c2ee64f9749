//! Text generation with a key/value cache: greedy by default, temperature / top-p sampling with
//! a seed on request; stops at a stop token or after `max_new_tokens`, handing each token to a
//! callback as it comes (for streaming).
//!
//! ```
//! use candle_core::{DType, Device};
//! use lora_models::generate::{generate, GenerateOptions, StopReason};
//! use lora_models::llama::load_llama;
//!
//! // A tiny random Llama from the test fixtures.
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/llm/tiny-llama");
//! let model = load_llama(dir.as_ref(), DType::F32, &Device::Cpu)?;
//! let options = GenerateOptions { max_new_tokens: 5, ..GenerateOptions::default() };
//! let mut streamed = Vec::new();
//! let out = generate(&model, &[1, 2, 3], &options, |id| Ok(streamed.push(id)))?;
//! assert_eq!((out.tokens.len(), out.stop), (5, StopReason::Length));
//! assert_eq!(streamed, out.tokens);
//! # Ok::<(), lora_models::ModelError>(())
//! ```

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::llama::LlamaForCausalLM;

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// `0` (the default): greedy, the most likely token. Above 0: sample from
    /// `softmax(logits / temperature)`.
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at least
    /// `top_p` (1.0: all). Only with a temperature above 0.
    pub top_p: f64,
    /// The seed of the sampler.
    pub seed: u64,
    /// Token ids that end the generation (they are not part of the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token came.
    StopToken,
    /// `max_new_tokens` were generated.
    Length,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
}

/// The token to emit from `logits` (f32 `[vocab]`).
fn pick(logits: &[f32], options: &GenerateOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if options.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let t = options.temperature as f32;
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, ((v - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|(_, p)| p).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = Vec::new();
    let mut mass = 0f32;
    for (id, p) in probs {
        let p = p / total;
        kept.push((id, p));
        mass += p;
        if f64::from(mass) >= options.top_p {
            break;
        }
    }
    let mut u = rng.random::<f32>() * mass;
    for &(id, p) in &kept {
        if u < p {
            return id;
        }
        u -= p;
    }
    kept.last().map_or_else(argmax, |(id, _)| *id)
}

/// The token picker of [`generate`] for callers that run the model themselves (a server stepping
/// many sequences): greedy or seeded temperature / top-p sampling, as `generate` does, so the
/// same options and seed give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    options: GenerateOptions,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `options` (its seed; `max_new_tokens` and `stop_tokens` are not used).
    pub fn new(options: &GenerateOptions) -> Self {
        Self {
            options: options.clone(),
            rng: StdRng::seed_from_u64(options.seed),
        }
    }

    /// The next token from `logits` (f32 `[vocab]`).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        pick(logits, &self.options, &mut self.rng)
    }
}

/// Generates after `prompt` (token ids), calling `on_token` with each new token as it comes.
///
/// # Errors
/// An empty prompt; a prompt longer than the model's context; errors of the forward pass or of
/// `on_token`.
pub fn generate(
    model: &LlamaForCausalLM,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&id| id as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary ({vocab} tokens)"
        )));
    }
    let device = model.model.embed_tokens.device().clone();
    let mut cache = model.new_cache();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut input = Tensor::new(prompt, &device)?.unsqueeze(0)?;
    let mut tokens = Vec::new();
    while tokens.len() < options.max_new_tokens {
        let logits = model.forward_last(&input, &mut cache)?;
        let logits: Vec<f32> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
        let next = pick(&logits, options, &mut rng);
        if options.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                stop: StopReason::StopToken,
            });
        }
        tokens.push(next);
        on_token(next)?;
        input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
    }
    Ok(Generation {
        tokens,
        stop: StopReason::Length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_the_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(pick(&logits, &GenerateOptions::default(), &mut rng), 1);
        // top_p small: only the most likely token is kept, whatever the temperature.
        let options = GenerateOptions {
            temperature: 5.0,
            top_p: 0.01,
            ..GenerateOptions::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &options, &mut rng), 1);
        }
        // A high temperature with the whole nucleus reaches other tokens.
        let options = GenerateOptions {
            temperature: 10.0,
            ..GenerateOptions::default()
        };
        let seen: std::collections::HashSet<u32> = (0..200)
            .map(|_| pick(&logits, &options, &mut rng))
            .collect();
        assert!(seen.len() >= 3, "{seen:?}");
    }
}
