//! [`Pretrained`]: a model with its tokenizer, from a GGUF file or a Hugging Face directory -
//! what `lora generate` (and later `train` and `serve`) load.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use lora_models::generate::GenerateOptions;
//! use lora_models::{Message, Pretrained};
//!
//! let pretrained = Pretrained::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), DType::F32, &Device::Cpu)?;
//! let prompt = pretrained.chat_prompt(&[Message::new("user", "What is the capital of France?")])?;
//! let answer = pretrained.generate_text(&prompt, &GenerateOptions::default(), |_| Ok(()))?;
//! assert!(answer.starts_with("The capital of France is Paris."));
//! # Ok::<(), lora_models::ModelError>(())
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::chat::Message;
use crate::error::Result;
use crate::generate::{generate, GenerateOptions, Generation};
use crate::llama::{
    float_only, load_gguf_content, load_hf_dir, open_gguf, Checkpoint, LlamaForCausalLM, Precision,
};
use crate::tokenizer::TextTokenizer;

/// A model and its tokenizer.
#[derive(Debug)]
pub struct Pretrained {
    /// The model.
    pub model: LlamaForCausalLM,
    /// Its tokenizer (with the chat template and stop tokens).
    pub tokenizer: TextTokenizer,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl Pretrained {
    /// Loads a model and its tokenizer from a GGUF file or a Hugging Face model directory
    /// (`tokenizer.json`, `tokenizer_config.json`), float weights in a dtype (a
    /// [`candle_core::DType`]) or, from a GGUF file, the projections kept quantized
    /// ([`Precision::Quantized`]).
    ///
    /// # Errors
    /// A [`ModelError`](crate::ModelError) naming the file and the field or tensor at fault.
    pub fn load(path: &Path, precision: impl Into<Precision>, device: &Device) -> Result<Self> {
        let precision = precision.into();
        let (model, tokenizer) = match Checkpoint::of(path)? {
            Checkpoint::Gguf(p) => {
                // One read of the header for both the model and the tokenizer.
                let (mut file, content) = open_gguf(&p)?;
                let tokenizer = TextTokenizer::from_gguf(&content, &p)?;
                (
                    load_gguf_content(&p, &mut file, &content, precision, device)?,
                    tokenizer,
                )
            }
            Checkpoint::HfDir(p) => (
                load_hf_dir(&p, float_only(&p, precision)?, device)?,
                TextTokenizer::from_hf_dir(&p)?,
            ),
        };
        Ok(Self {
            model,
            tokenizer,
            path: path.to_path_buf(),
        })
    }

    /// The token ids of a chat prompt: `messages` rendered with the model's chat template, ending
    /// with the header of the assistant's turn.
    ///
    /// # Errors
    /// No chat template; a template error; a tokenizer error.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        self.tokenizer.encode_raw(&text)
    }

    /// The stop tokens: the tokenizer's end-of-turn ids and the config's `eos_token_id`s.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut stop: Vec<u32> = self.tokenizer.stop_token_ids().to_vec();
        for id in &self.model.config().eos_token_ids {
            if !stop.contains(id) {
                stop.push(*id);
            }
        }
        stop
    }

    /// Generates after `prompt` and returns the text, handing each piece of text to `on_text`
    /// as soon as it is complete (for streaming). Stops at [`stop_tokens`](Self::stop_tokens)
    /// unless `options` names its own.
    ///
    /// # Errors
    /// As [`generate`].
    pub fn generate_text(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<String> {
        let (text, _) = self.generate_streaming(prompt, options, &mut on_text)?;
        Ok(text)
    }

    /// [`generate_text`](Self::generate_text), also returning the [`Generation`].
    ///
    /// # Errors
    /// As [`generate`].
    pub fn generate_streaming(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<(String, Generation)> {
        let mut options = options.clone();
        if options.stop_tokens.is_empty() {
            options.stop_tokens = self.stop_tokens();
        }
        let mut stream = self.tokenizer.stream();
        let mut text = String::new();
        let generation = generate(&self.model, prompt, &options, |id| {
            if let Some(piece) = stream.push(id)? {
                text.push_str(&piece);
                on_text(&piece)?;
            }
            Ok(())
        })?;
        if let Some(rest) = stream.finish()? {
            text.push_str(&rest);
            on_text(&rest)?;
        }
        Ok((text, generation))
    }
}
