//! [`LlamaConfig`]: the hyper-parameters of a Llama-family decoder, read from a Hugging Face
//! `config.json` (Llama, Qwen2) or from GGUF metadata (`llama.*`).

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Llama-3 RoPE scaling (`rope_scaling = {"rope_type": "llama3", ...}` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

/// How the rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    None,
    /// Llama-3's frequency-dependent scaling, from `config.json`.
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors, as GGUF stores Llama-3 scaling (`rope_freqs.weight`, one value a
    /// frequency): the inverse frequency `i` is divided by `factors[i]`.
    Factors(Vec<f32>),
}

/// The hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type`: `llama` or `qwen2`.
    pub model_type: String,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (grouped-query attention when fewer than the heads).
    pub num_key_value_heads: usize,
    /// `head_dim` (default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`: the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections with a bias (Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
    /// `mlp_bias` (Llama).
    pub mlp_bias: bool,
    /// `bos_token_id`, if given.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`s, if given.
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as transformers writes it for Llama and Qwen2 (the fields we use).
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    architectures: Option<Vec<String>>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` of a Llama or Qwen2 model.
    ///
    /// # Errors
    /// [`ModelError::Io`], [`ModelError::Json`], or [`ModelError::Unsupported`] naming the field
    /// (another architecture, an unknown RoPE scaling, inconsistent head counts).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` names it in errors.
    ///
    /// # Errors
    /// As [`from_hf_file`](Self::from_hf_file).
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let unsupported = |field: &str, reason: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let model_type = hf.model_type.clone().unwrap_or_else(|| "llama".into());
        if !matches!(model_type.as_str(), "llama" | "qwen2") {
            return Err(unsupported(
                "model_type",
                format!(
                    "`{model_type}` is not a Llama-family model this crate implements (`llama`, `qwen2`){}",
                    hf.architectures
                        .as_ref()
                        .map(|a| format!(" (architectures: {a:?})"))
                        .unwrap_or_default()
                ),
            ));
        }
        // transformers 5 moved `rope_theta` / `rope_scaling` into `rope_parameters`.
        let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10_000.0);
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let rope_scaling = match (rope_type, rope) {
            ("default", _) | (_, None) => RopeScaling::None,
            ("llama3", Some(value)) => RopeScaling::Llama3(
                serde_json::from_value(value.clone()).map_err(|e| {
                    unsupported("rope_scaling", format!("llama3 scaling needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings: {e}"))
                })?,
            ),
            (other, Some(_)) => {
                return Err(unsupported(
                    "rope_scaling",
                    format!("rope type `{other}` is not supported (only default and llama3)"),
                ))
            }
        };
        let heads = hf.num_attention_heads;
        let kv_heads = hf.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(unsupported(
                "num_key_value_heads",
                format!("{kv_heads} key/value heads do not divide {heads} attention heads"),
            ));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / heads);
        let eos_token_ids = match &hf.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| v as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        };
        let config = Self {
            attention_bias: hf.attention_bias.unwrap_or(model_type == "qwen2"),
            model_type,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            mlp_bias: hf.mlp_bias,
            bos_token_id: hf.bos_token_id,
            eos_token_ids,
        };
        config.check(path)?;
        Ok(config)
    }

    /// The `config.json` transformers reads back into this config (`LlamaForCausalLM` or
    /// `Qwen2ForCausalLM`, f32 weights).
    ///
    /// # Errors
    /// [`ModelError::Unsupported`] for RoPE scaling held as per-frequency factors (GGUF's
    /// `rope_freqs.weight`), which `config.json` cannot express.
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Llama3(s) => serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            RopeScaling::Factors(_) => {
                return Err(ModelError::Unsupported {
                    path: "config.json".into(),
                    field: "rope_scaling".into(),
                    reason: "RoPE scaling given as per-frequency factors (GGUF `rope_freqs.weight`) has no config.json form".into(),
                })
            }
        };
        let architecture = if self.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => serde_json::Value::Null,
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        Ok(serde_json::json!({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        }))
    }

    /// Checks the sizes agree with each other.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("RoPE needs an even head dimension, got {}", self.head_dim),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads.max(1))
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
        ] {
            if value == 0 {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The inverse rotary frequencies `theta^(-2i/d)`, `i < d/2`, scaled as configured.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Factors(factors) => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(&f, &k)| (f / f64::from(k)) as f32)
                .collect(),
            RopeScaling::Llama3(s) => {
                // transformers' `_compute_llama3_parameters`.
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            f
                        };
                        // Wavelengths are finite: `>=` / `<=` are the negations transformers writes.
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                        let out = if medium {
                            let smooth = (old / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * scaled / s.factor + smooth * scaled
                        } else {
                            scaled
                        };
                        out as f32
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's converter stores Llama-3 scaling as `rope_freqs.weight`, one divisor a
    /// frequency (`convert_hf_to_gguf.py`, `LlamaModel.generate_extra_tensors`): written out
    /// here as it does, the GGUF path must give the inverse frequencies of the config path.
    #[test]
    fn gguf_rope_factors_give_the_llama3_frequencies() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/llm/tiny-llama/config.json"),
        )
        .unwrap();
        let config = LlamaConfig::from_hf_json(&text, Path::new("config.json")).unwrap();
        let RopeScaling::Llama3(s) = config.rope_scaling.clone() else {
            panic!("tiny-llama has Llama-3 scaling: {:?}", config.rope_scaling)
        };
        let (d, base) = (config.head_dim, config.rope_theta);
        let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
        let factors: Vec<f32> = (0..d / 2)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f64 / d as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let factor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    1.0 / ((1.0 - smooth) / s.factor + smooth)
                };
                factor as f32
            })
            .collect();
        assert!(
            factors.iter().any(|&f| f > 1.0 && f < s.factor as f32),
            "a medium band"
        );
        let from_gguf = LlamaConfig {
            rope_scaling: RopeScaling::Factors(factors),
            ..config.clone()
        };
        for (a, b) in config.inv_freq().iter().zip(from_gguf.inv_freq()) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
        }
    }
}
