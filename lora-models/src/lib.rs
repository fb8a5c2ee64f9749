//! Pretrained model families written with `#[lora]`, for the [`lora`](https://docs.rs/lora)
//! crate: a Llama-family decoder ([`llama`]) that loads Hugging Face and GGUF checkpoints and
//! takes any PEFT adapter, its tokenizer ([`TextTokenizer`]: byte-level BPE from GGUF metadata or
//! `tokenizer.json`, id for id what transformers builds) and chat templates ([`render_chat`]),
//! and generation ([`generate`], [`Pretrained`]).
//!
//! Modules depend on each other in one direction: `error` -> `cache`, `chat` -> `tokenizer` ->
//! `llama` -> `generate` -> `pretrained`; `sft` (training) sits beside `llama`, which implements
//! its [`sft::CausalLm`] seam.
//!
//! Field names are transformers' module paths, so `model.layers.0.self_attn.q_proj` here is
//! `model.layers.0.self_attn.q_proj` in PyTorch, and PEFT adapters load by name.
#![warn(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod cache;
pub mod chat;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod llama;
pub mod pretrained;
pub mod sft;
pub mod tokenizer;

pub use chat::{render_chat, Message};
pub use error::{ModelError, Result};
pub use pretrained::Pretrained;
pub use tokenizer::{TextTokenizer, TokenStream};
