//! `lora`: merge a PEFT LoRA adapter into a safetensors model, or inspect an adapter, with no
//! model code; generate text with a Llama-family model and an adapter.
//!
//! ```text
//! lora merge --base model.safetensors --adapter my-adapter --out merged.safetensors
//! lora merge --base sharded-model-dir --adapter my-adapter --out merged-dir
//! lora merge --base model.gguf --adapter my-adapter --out merged.gguf --type q8_0
//! lora export --format gguf --adapter my-adapter --base model.gguf --out adapter.gguf
//! lora inspect my-adapter
//! lora generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?"
//! lora train --model SmolLM2-135M-Instruct.Q4_1.gguf --data train.jsonl --out my-adapter
//! lora serve --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter mine=my-adapter --port 8000
//! ```

mod generate;
mod serve;
mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lora::merge_file::merge_safetensors_with;
use lora::models::gguf::{
    export_lora_gguf, merge_gguf, type_name, ExportOptions, ExportType, GgufMergeOptions,
    TargetType,
};
use lora::models::llama::Checkpoint;
use lora::peft::AdapterFile;
use lora::TargetModules;

#[derive(Parser)]
#[command(
    name = "lora",
    version,
    about = "Merge and inspect PEFT LoRA adapters; generate with Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge an adapter into a safetensors model (a file, or a directory of shards with
    /// model.safetensors.index.json; the output has the same form, dtypes are kept) or into a
    /// GGUF model (adapted tensors dequantized, merged and quantized again, see --type).
    Merge {
        /// The base model: a .safetensors file, a sharded model directory or a .gguf file.
        #[arg(long)]
        base: PathBuf,
        /// The PEFT adapter directory (adapter_model.safetensors + adapter_config.json).
        #[arg(long)]
        adapter: PathBuf,
        /// Where to write the merged model (a file for a file base, a directory otherwise).
        #[arg(long)]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Merge even if the adapter records a fingerprint of a different base weight.
        #[arg(long)]
        no_verify_base: bool,
        /// GGUF only: the type adapted tensors are written in (`same`: each tensor's own; f32,
        /// f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k). K-quants fall
        /// back per tensor as llama.cpp's quantizer does when rows are not multiples of 256.
        #[arg(long = "type", value_name = "TYPE")]
        target: Option<TargetType>,
    },
    /// Export an adapter for another runtime: `--format gguf` writes llama.cpp's LoRA adapter
    /// GGUF (`llama-cli --lora adapter.gguf`), each module's PEFT scaling folded into one alpha.
    Export {
        /// The output format.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// The GGUF model the adapter belongs to (tensor names, shapes, head counts).
        #[arg(long)]
        base: PathBuf,
        /// Where to write the adapter GGUF.
        #[arg(long)]
        out: PathBuf,
        /// The type of the factors: f32, f16, bf16 or q8_0 (factors whose rows are not
        /// multiples of 32 fall back to f16).
        #[arg(long, default_value = "f32")]
        outtype: ExportType,
    },
    /// Print an adapter's ranks, alphas, scalings, targets, parameter count, dtype and size.
    Inspect {
        /// The PEFT adapter directory.
        adapter: PathBuf,
    },
    /// Generate text with a Llama-family model (a .gguf file or a Hugging Face directory),
    /// optionally with a PEFT adapter. stdout carries exactly the completion.
    Generate(generate::GenerateArgs),
    /// Fine-tune a Llama-family model on JSONL data (chat, prompt/completion or text): a LoRA
    /// adapter in PEFT's format, or with --full every weight.
    Train(Box<train::TrainArgs>),
    /// Serve a Llama-family model and its LoRA adapters over an OpenAI-compatible HTTP API
    /// (`/v1/completions`, `/v1/chat/completions`, `/v1/models`), requests for different
    /// adapters decoded together.
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    // candle asks for its thread count in every CPU matmul, and where it cannot tell
    // performance cores apart that re-reads /proc/cpuinfo each time (~10% of a batched decoding
    // step). Answered once here, through the variable it checks first, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = lora::candle::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let cli = Cli::parse();
    let merging = matches!(cli.command, Command::Merge { .. });
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Merge {
            base,
            adapter,
            out,
            quiet,
            no_verify_base,
            target,
        } => merge(base, adapter, out, quiet, !no_verify_base, target),
        Command::Export {
            format: ExportFormat::Gguf,
            adapter,
            base,
            out,
            outtype,
        } => export_gguf(adapter, base, out, outtype).map_err(Into::into),
        Command::Inspect { adapter } => inspect(adapter).map_err(Into::into),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(*args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mismatch = matches!(
                e.downcast_ref::<lora::Error>(),
                Some(lora::Error::BaseMismatch { .. })
            ) || matches!(
                e.downcast_ref::<lora::models::ModelError>(),
                Some(lora::models::ModelError::Lora(
                    lora::Error::BaseMismatch { .. }
                ))
            );
            if merging && mismatch {
                eprintln!("hint: pass --no-verify-base to merge anyway");
            }
            ExitCode::FAILURE
        }
    }
}

fn merge_bar(quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} merging [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// A progress callback that moves `bar`.
fn track(bar: &ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

fn merge(
    base: PathBuf,
    adapter: PathBuf,
    out: PathBuf,
    quiet: bool,
    verify_base: bool,
    target: Option<TargetType>,
) -> Result<(), Box<dyn std::error::Error>> {
    if matches!(Checkpoint::of(&base), Ok(Checkpoint::Gguf(_))) {
        let options = GgufMergeOptions {
            target: target.unwrap_or_default(),
            verify_base,
        };
        return merge_gguf_cli(&base, &adapter, &out, quiet, &options);
    }
    if target.is_some() {
        return Err(format!(
            "--type applies to GGUF bases only: {} is not a GGUF file (safetensors merges keep each tensor's dtype)",
            base.display()
        )
        .into());
    }
    let start = Instant::now();
    let bar = merge_bar(quiet);
    let options = lora::LoadOptions::default().with_verify_base(verify_base);
    let report = merge_safetensors_with(&base, &adapter, &out, &options, &mut track(&bar));
    bar.finish_and_clear();
    let report = report?;
    if !quiet {
        println!(
            "merged {} of {} tensors ({:.1} MB in {} file(s)) into {} in {:.2} s",
            report.merged,
            report.tensors,
            report.bytes as f64 / 1e6,
            report.files,
            out.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn merge_gguf_cli(
    base: &Path,
    adapter: &Path,
    out: &Path,
    quiet: bool,
    options: &GgufMergeOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let bar = merge_bar(quiet);
    let report = merge_gguf(base, adapter, out, options, &mut track(&bar));
    bar.finish_and_clear();
    let report = report?;
    if !quiet {
        println!(
            "tensor                         stored -> written   max rel. error  mean rel. error"
        );
        for t in &report.merged {
            println!(
                "{:<30} {:>6} -> {:<7}{} {:>14.3e}  {:>15.3e}",
                t.name,
                type_name(t.stored),
                t.written_name(),
                if t.fell_back() {
                    format!(" (fallback for {})", type_name(t.requested))
                } else {
                    String::new()
                },
                t.max_rel_error,
                t.mean_rel_error
            );
        }
        let fallbacks = report.merged.iter().filter(|t| t.fell_back()).count();
        println!(
            "merged {} of {} tensors ({} fell back) into {} ({:.1} MB) in {:.2} s; requantization error: max rel. {:.3e}, mean rel. {:.3e}",
            report.merged.len(),
            report.tensors,
            fallbacks,
            out.display(),
            report.bytes as f64 / 1e6,
            start.elapsed().as_secs_f64(),
            report.max_rel_error(),
            report.mean_rel_error()
        );
    }
    Ok(())
}

/// The formats `lora export` writes.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// llama.cpp's LoRA adapter GGUF.
    Gguf,
}

fn export_gguf(
    adapter: PathBuf,
    base: PathBuf,
    out: PathBuf,
    outtype: ExportType,
) -> Result<(), lora::models::ModelError> {
    let report = export_lora_gguf(&adapter, &base, &out, &ExportOptions { outtype })?;
    println!(
        "exported {} modules to {} (adapter.lora.alpha = {})",
        report.modules,
        out.display(),
        report.alpha
    );
    for (module, factor) in &report.folded {
        println!("  {module}: scaling folded into lora_b (x {factor})");
    }
    for t in &report.fallbacks {
        println!("  {t}: f16 (rows not a multiple of 32 for q8_0)");
    }
    Ok(())
}

fn inspect(dir: PathBuf) -> Result<(), lora::Error> {
    let adapter = AdapterFile::read(&dir)?;
    let cfg = &adapter.config;
    let size = std::fs::metadata(&adapter.path)
        .map_err(|source| lora::Error::Io {
            path: adapter.path.clone(),
            source,
        })?
        .len();
    let mut ranks: BTreeMap<usize, usize> = BTreeMap::new();
    let mut scalings: BTreeMap<String, usize> = BTreeMap::new();
    let mut alphas: BTreeMap<String, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut params = 0usize;
    for (module, f) in &adapter.factors {
        *ranks.entry(f.rank()).or_default() += 1;
        *alphas
            .entry(format!("{}", cfg.alpha_for(module)))
            .or_default() += 1;
        *scalings
            .entry(format!("{:.6}", cfg.scaling_for(module)))
            .or_default() += 1;
        *dtypes.entry(format!("{:?}", f.a.dtype())).or_default() += 1;
        params += f.a.elem_count()
            + f.b.elem_count()
            + f.magnitude.as_ref().map_or(0, |(_, m)| m.elem_count())
            + f.e.as_ref().map_or(0, |(_, e)| e.elem_count());
    }
    let counted = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, n)| format!("{k} ({n} modules)"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let targets = match &cfg.targets {
        TargetModules::List(names) => names.join(", "),
        TargetModules::Regex(re) => format!("regex {re}"),
    };
    println!("adapter:    {}", adapter.path.display());
    println!("modules:    {}", adapter.factors.len());
    println!(
        "rank:       {}",
        ranks
            .iter()
            .map(|(r, n)| format!("{r} ({n} modules)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("alpha:      {}", counted(&alphas));
    println!(
        "scaling:    {}{}",
        counted(&scalings),
        if cfg.adalora.is_some() {
            " (AdaLoRA: alpha/(ranknum + 1e-5))"
        } else if cfg.use_rslora {
            " (rsLoRA: alpha/sqrt(r))"
        } else {
            " (alpha/r)"
        }
    );
    if let Some(ada) = &cfg.adalora {
        let s = &ada.schedule;
        println!(
            "adalora:    init_r {} (ranknum), target_r {}, {} modules with a rank pattern; \
             tinit {}, tfinal {}, deltaT {}, total_step {}",
            ada.init_r,
            s.target_r,
            ada.rank_pattern.as_ref().map_or(0, |p| p.len()),
            s.tinit,
            s.tfinal,
            s.delta_t,
            s.total_step.map_or("none".into(), |t| t.to_string()),
        );
    }
    println!("targets:    {targets}");
    println!("fan_in_fan_out: {}", cfg.fan_in_fan_out);
    println!("parameters: {params}");
    println!(
        "dtype:      {}",
        dtypes.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    println!("size:       {size} bytes ({:.2} MB)", size as f64 / 1e6);
    Ok(())
}
