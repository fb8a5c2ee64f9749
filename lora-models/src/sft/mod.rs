//! Supervised fine-tuning of causal language models: what `lora train` runs, as a library.
//!
//! - [`data`]: JSONL files in TRL's formats (`messages`, `prompt`/`completion`, `text`),
//!   tokenized with a loss mask found by position.
//! - [`batch`]: padded batches and the loss over their target positions; [`CausalLm`], the seam
//!   a model implements to be trained here (the Llama family does).
//! - [`run`]: the loop ([`train`]): AdamW with warmup and cosine decay, gradient accumulation and
//!   clipping, seeded shuffling and dropout, eval, checkpoints that resume bit for bit.
//!
//! Modules depend on each other in one direction: `data` -> `batch` -> `run`.

pub mod batch;
pub mod data;
pub mod run;

pub use batch::{loss_sum, Batch, CausalLm};
pub use data::{DataOptions, Dataset, Example, LossOn};
pub use run::{checkpoint_name, evaluate, train, Duration, Event, Outcome, SftConfig, Tuning};
