//! `lora generate`: text from a Llama-family model (GGUF or Hugging Face directory), optionally
//! with a PEFT adapter. stdout carries exactly the completion; everything else goes to stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use lora::candle::{DType, Device};
use lora::models::generate::GenerateOptions;
use lora::models::llama::Precision;
use lora::models::{Message, ModelError, Pretrained};
use lora::LoraModelExt;

/// How the weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    /// f32 (GGUF tensors dequantized).
    F32,
    /// f16.
    F16,
    /// bf16.
    Bf16,
    /// The projections as stored in a GGUF file, quantized (QLoRA); the rest f32.
    Quantized,
}

impl WeightDtype {
    /// What the loader is asked for.
    pub fn precision(self) -> Precision {
        match self {
            Self::F32 => Precision::Float(DType::F32),
            Self::F16 => Precision::Float(DType::F16),
            Self::Bf16 => Precision::Float(DType::BF16),
            Self::Quantized => Precision::Quantized,
        }
    }
}

/// The arguments of `lora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a `.gguf` file, a Hugging Face model directory, or a hub id
    /// (`HuggingFaceTB/SmolLM2-135M-Instruct`, resolved through the Hugging Face cache).
    #[arg(long)]
    model: String,
    /// The weights' dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDtype,
    /// A PEFT adapter directory to apply (unmerged unless --merge).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before generating (not with `--dtype quantized`).
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// The prompt (read from stdin when absent).
    #[arg(long)]
    prompt: Option<String>,
    /// A system prompt, replacing the chat template's default.
    #[arg(long, conflicts_with = "raw")]
    system: Option<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: the smallest set of tokens with at least this probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// The sampler's seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
}

/// Runs `lora generate`.
pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.merge && args.dtype == WeightDtype::Quantized {
        return Err(
            "--merge needs dense weights: a quantized base does not merge (use --dtype f32, or \
             write a merged GGUF with `lora merge --base model.gguf`)"
                .into(),
        );
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(format!("--temperature must be >= 0, got {}", args.temperature).into());
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p must be in (0, 1], got {}", args.top_p).into());
    }
    let start = Instant::now();
    let path = lora::models::hub::resolve_model(&args.model)?;
    let mut pretrained = Pretrained::load(&path, args.dtype.precision(), &Device::Cpu)?;
    eprintln!(
        "loaded {} in {:.2} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    if let Some(adapter) = &args.adapter {
        pretrained.model.load_adapter(adapter)?;
        if args.merge {
            pretrained.model.merge()?;
        }
        eprintln!(
            "adapter {} ({})",
            adapter.display(),
            if args.merge { "merged" } else { "unmerged" }
        );
    }
    let text = match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("reading the prompt from stdin: {e}"))?;
            s
        }
    };
    let prompt = if args.raw {
        pretrained.tokenizer.encode(&text)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", text));
        pretrained.chat_prompt(&messages)?
    };
    let options = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: Vec::new(),
    };
    let begin = Instant::now();
    let mut first: Option<f64> = None;
    let mut stdout = std::io::stdout().lock();
    let (_, generation) = pretrained.generate_streaming(&prompt, &options, &mut |piece| {
        first.get_or_insert_with(|| begin.elapsed().as_secs_f64());
        stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|e| ModelError::Input(format!("writing to stdout: {e}")))
    })?;
    writeln!(stdout)?;
    let total = begin.elapsed().as_secs_f64();
    let prompt_s = first.unwrap_or(total);
    let n = generation.tokens.len();
    eprintln!(
        "prompt: {} tokens in {:.2} s ({:.1} tokens/s); generated {} tokens in {:.2} s ({:.1} tokens/s), stop: {:?}",
        prompt.len(),
        prompt_s,
        prompt.len() as f64 / prompt_s.max(1e-9),
        n,
        total - prompt_s,
        n.saturating_sub(1) as f64 / (total - prompt_s).max(1e-9),
        generation.stop
    );
    Ok(())
}
