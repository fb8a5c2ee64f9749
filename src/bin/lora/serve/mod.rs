//! `lora serve`: an OpenAI-compatible server for a Llama-family model with many LoRA adapters,
//! requests for different adapters decoded together (continuous batching, one forward a step).
//!
//! - [`api`]: the requests' fields and OpenAI's error body;
//! - [`engine`]: the thread that owns the model and runs the batch;
//! - [`routes`]: the axum handlers between the two.

mod api;
mod engine;
mod routes;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use clap::Args;
use lora::candle::Device;
use lora::models::Pretrained;
use lora::LoraModelExt;

use crate::generate::WeightDtype;

/// The arguments of `lora serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model: a `.gguf` file, a Hugging Face model directory, or a hub id.
    #[arg(long)]
    model: String,
    /// The weights' dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: WeightDtype,
    /// An adapter to serve, `NAME=DIR` (a PEFT adapter directory); repeat for more.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// The name of the base model in requests and `/v1/models` (default: the model file's stem,
    /// or the hub id).
    #[arg(long)]
    served_model_name: Option<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// The most adapters held at once; loading one more is refused.
    #[arg(long, default_value_t = 8)]
    max_loras: usize,
    /// Serve `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    #[arg(long)]
    allow_runtime_lora: bool,
}

/// Runs `lora serve` until Ctrl-C.
pub fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.max_batch == 0 {
        return Err("--max-batch must be at least 1".into());
    }
    let path = lora::models::hub::resolve_model(&args.model)?;
    let pretrained = Pretrained::load(&path, args.dtype.precision(), &Device::Cpu)?;
    let base_name = match args.served_model_name {
        Some(name) => name,
        // A hub id names itself; a file or directory by its stem.
        None if !Path::new(&args.model).exists() => args.model.clone(),
        None => served_name(&path),
    };
    let stop_tokens = pretrained.stop_tokens();
    let Pretrained {
        mut model,
        tokenizer,
        ..
    } = pretrained;
    let limits = engine::Limits {
        max_batch: args.max_batch,
        max_loras: args.max_loras,
        base_name: base_name.clone(),
    };
    for spec in &args.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            return Err(format!("--adapter `{spec}`: expected NAME=DIR").into());
        };
        engine::load(&mut model, &limits, name, dir)
            .map_err(|e| format!("--adapter {spec}: {}", e.message))?;
    }
    model.set_active_adapter(None)?;
    eprintln!(
        "serving {} as `{base_name}` with adapters [{}]",
        path.display(),
        model.adapters().join(", ")
    );
    let context = model.config().max_position_embeddings;
    let tokenizer = Arc::new(tokenizer);
    let (tx, rx) = std::sync::mpsc::channel();
    let engine_tokenizer = Arc::clone(&tokenizer);
    let worker = std::thread::Builder::new()
        .name("lora-engine".into())
        .spawn(move || engine::run(model, &engine_tokenizer, &stop_tokens, &limits, rx))?;
    let state = Arc::new(routes::AppState {
        engine: tx,
        tokenizer,
        base_name,
        context,
        counter: AtomicU64::new(0),
    });
    let app = routes::router(state, args.allow_runtime_lora);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served: Result<(), Box<dyn std::error::Error>> = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| format!("binding {}:{}: {e}", args.host, args.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    });
    drop(runtime);
    // The router (and with it the engine's inbox) is gone: the engine ends.
    if worker.join().is_err() {
        return Err("the engine thread failed".into());
    }
    served
}

/// The model file's stem (`SmolLM2-135M-Instruct.Q4_1`), or the directory's name.
fn served_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}
