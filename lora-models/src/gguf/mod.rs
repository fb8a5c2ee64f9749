//! PEFT adapters and GGUF files: [`merge_gguf`] merges an adapter into a GGUF model (what
//! `lora merge --base model.gguf` runs), dequantizing each adapted tensor, adding the adapter's
//! f32 delta and quantizing the result again; [`export_lora_gguf`] writes an adapter as
//! llama.cpp's LoRA adapter GGUF (`lora export --format gguf`).
//!
//! Both use the loader's GGUF names (`model.layers.N.self_attn.q_proj` is `blk.N.attn_q`) and
//! llama.cpp's row permutation of `attn_q` / `attn_k`, so the stored rows and an adapter's rows
//! (transformers' order) meet as the loader makes them meet.
//!
//! ```no_run
//! use lora_models::gguf::{merge_gguf, GgufMergeOptions, TargetType};
//! let options = GgufMergeOptions { target: "q8_0".parse::<TargetType>()?, ..Default::default() };
//! let report = merge_gguf("model.gguf".as_ref(), "my-adapter".as_ref(), "merged.gguf".as_ref(),
//!                         &options, &mut |_done, _total| {})?;
//! for t in &report.merged {
//!     println!("{} -> {} (max rel. error {:.2e})", t.name, t.written_name(), t.max_rel_error);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod export;
mod file;
mod merge;

pub use export::{export_lora_gguf, ExportOptions, ExportReport, ExportType};
pub use file::type_name;
pub use merge::{
    fallback_type, merge_gguf, GgufMergeOptions, GgufMergeReport, MergedTensor, TargetType,
};
