//! What fine-tuning needs of the Llama model beyond LoRA: the [`CausalLm`] seam of the training
//! loop, every weight made trainable (full fine-tuning), and the model written back as a
//! Hugging Face directory.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use candle_nn::{Embedding, Linear, Module, RmsNorm};
use lora_runtime::train::{write_safetensors, Checkpointing};
use lora_runtime::LoraLinear;

use super::model::{LlamaForCausalLM, TokenEmbedding};
use crate::error::{ModelError, Result};
use crate::sft::CausalLm;
use crate::tokenizer::TextTokenizer;

/// A trainable copy of `t`, registered under `name`.
fn var(vars: &mut Vec<(String, Var)>, name: String, t: &Tensor) -> Result<Tensor> {
    let v = Var::from_tensor(t)?;
    let tensor = v.as_tensor().clone();
    vars.push((name, v));
    Ok(tensor)
}

/// The dense embedding table (full fine-tuning and saving a model need one).
fn dense_table(embedding: &TokenEmbedding) -> Result<&Embedding> {
    embedding.dense().ok_or_else(|| {
        ModelError::Input(
            "the model's weights are quantized: full fine-tuning and saving a whole model need \
             them dense (load the model with a float dtype)"
                .into(),
        )
    })
}

/// `layer` with its weight and bias replaced by trainable copies.
fn unfreeze_linear(
    vars: &mut Vec<(String, Var)>,
    path: &str,
    layer: &LoraLinear,
) -> Result<LoraLinear> {
    let weight = var(
        vars,
        format!("{path}.weight"),
        layer.weight().map_err(|e| e.at(path))?,
    )?;
    let bias = match layer.bias() {
        Some(b) => Some(var(vars, format!("{path}.bias"), b)?),
        None => None,
    };
    Ok(LoraLinear::new_unfrozen(Linear::new(weight, bias)))
}

fn unfreeze_norm(vars: &mut Vec<(String, Var)>, path: &str, norm: &RmsNorm) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        var(vars, format!("{path}.weight"), norm.weight())?,
        norm.eps(),
    ))
}

impl CausalLm for LlamaForCausalLM {
    fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        match self.gradient_checkpointing() {
            Some(ck) => self.model.forward_checkpointed(ids, ck),
            None => self.model.forward(ids, &mut self.new_cache()),
        }
    }

    fn set_gradient_checkpointing(&mut self, ck: Option<Checkpointing>) -> Result<()> {
        LlamaForCausalLM::set_gradient_checkpointing(self, ck);
        Ok(())
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    fn lm_head_weight(&self) -> Option<&Tensor> {
        self.lm_head.plain_weight()
    }

    fn unfreeze(&mut self) -> Result<Vec<(String, Var)>> {
        if lora_runtime::LoraModelExt::is_merged(self) {
            return Err(ModelError::Input(
                "full fine-tuning of a merged model: unmerge it first".into(),
            ));
        }
        let mut vars = Vec::new();
        let m = &mut self.model;
        let table = dense_table(&m.embed_tokens)?;
        let embed = var(
            &mut vars,
            "model.embed_tokens.weight".into(),
            table.embeddings(),
        )?;
        m.embed_tokens = TokenEmbedding::Dense(Embedding::new(embed.clone(), table.hidden_size()));
        for (i, layer) in m.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut layer.self_attn;
            a.q_proj = unfreeze_linear(&mut vars, &format!("{p}.self_attn.q_proj"), &a.q_proj)?;
            a.k_proj = unfreeze_linear(&mut vars, &format!("{p}.self_attn.k_proj"), &a.k_proj)?;
            a.v_proj = unfreeze_linear(&mut vars, &format!("{p}.self_attn.v_proj"), &a.v_proj)?;
            a.o_proj = unfreeze_linear(&mut vars, &format!("{p}.self_attn.o_proj"), &a.o_proj)?;
            let mlp = &mut layer.mlp;
            mlp.gate_proj =
                unfreeze_linear(&mut vars, &format!("{p}.mlp.gate_proj"), &mlp.gate_proj)?;
            mlp.up_proj = unfreeze_linear(&mut vars, &format!("{p}.mlp.up_proj"), &mlp.up_proj)?;
            mlp.down_proj =
                unfreeze_linear(&mut vars, &format!("{p}.mlp.down_proj"), &mlp.down_proj)?;
            layer.input_layernorm = unfreeze_norm(
                &mut vars,
                &format!("{p}.input_layernorm"),
                &layer.input_layernorm,
            )?;
            layer.post_attention_layernorm = unfreeze_norm(
                &mut vars,
                &format!("{p}.post_attention_layernorm"),
                &layer.post_attention_layernorm,
            )?;
        }
        m.norm = unfreeze_norm(&mut vars, "model.norm", &m.norm)?;
        self.lm_head = if self.config().tie_word_embeddings {
            LoraLinear::new_unfrozen(Linear::new(embed, None))
        } else {
            unfreeze_linear(&mut vars, "lm_head", &self.lm_head)?
        };
        Ok(vars)
    }

    fn save_pretrained(&self, dir: &Path, tokenizer: &TextTokenizer) -> Result<()> {
        let config = self.config().to_hf_json()?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let m = &self.model;
        tensors.push((
            "model.embed_tokens.weight".into(),
            dense_table(&m.embed_tokens)?.embeddings().clone(),
        ));
        let mut linear = |path: String, l: &LoraLinear| -> Result<()> {
            tensors.push((
                format!("{path}.weight"),
                l.weight().map_err(|e| e.at(&path))?.clone(),
            ));
            if let Some(b) = l.bias() {
                tensors.push((format!("{path}.bias"), b.clone()));
            }
            Ok(())
        };
        for (i, layer) in m.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &layer.self_attn;
            for (name, l) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &layer.mlp.gate_proj),
                ("mlp.up_proj", &layer.mlp.up_proj),
                ("mlp.down_proj", &layer.mlp.down_proj),
            ] {
                linear(format!("{p}.{name}"), l)?;
            }
        }
        if !self.config().tie_word_embeddings {
            linear("lm_head".into(), &self.lm_head)?;
        }
        for (i, layer) in m.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            tensors.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight().clone(),
            ));
            tensors.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight().clone(),
            ));
        }
        tensors.push(("model.norm.weight".into(), m.norm.weight().clone()));
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(candle_core::DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        write_safetensors(
            &dir.join("model.safetensors"),
            &tensors,
            HashMap::from([("format".to_string(), "pt".to_string())]),
        )?;
        let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(value).map_err(|source| ModelError::Json {
                path: path.clone(),
                source,
            })?;
            std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
        };
        write_json("config.json", &config)?;
        tokenizer.save_hf(dir)
    }
}
