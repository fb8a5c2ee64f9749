//! The `#[lora]` attribute of the [`lora`](https://docs.rs/lora) crate. Use it through `lora`
//! (`use lora::prelude::*;`): the generated code names `::lora::__private`, so the versions of
//! this crate and the runtime always match.
//!
//! ```ignore
//! use candle_nn::Linear;
//! use lora::prelude::*;
//!
//! #[lora(rank = 8, alpha = 16, targets = ["q_proj", "v_proj"])]
//! pub struct Attention { q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear }
//!
//! #[lora] // a container: no targets of its own
//! pub struct Layer { #[lora(nested)] self_attn: Attention, mlp: Mlp }
//!
//! #[lora]
//! pub struct Model { #[lora(nested)] layers: Vec<Layer> }
//! ```
//!
//! The attribute rewrites the type of every target field to its LoRA layer: a
//! `candle_nn::Linear` to `lora::LoraLinear` (build it with `linear_no_bias(..)?.into()`), an
//! `Embedding` to `lora::LoraEmbedding`, a `Conv1d` / `Conv2d` to `lora::LoraConv1d` /
//! `lora::LoraConv2d` (each built from the candle layer with `.into()`), keeps everything else (other fields, generics, visibility,
//! documentation, derives and other attributes) and implements `lora::LoraModel`, whose module
//! paths are the field names: `layers.0.self_attn.q_proj`, as in PyTorch.
//!
//! # Struct arguments
//!
//! | argument | value | default |
//! |---|---|---|
//! | `targets` | `["q_proj", ..]`: the fields that get an adapter, each a `candle_nn::Linear`, `Embedding`, `Conv1d` or `Conv2d` (or the matching `lora::LoraLinear`, `LoraEmbedding`, `LoraConv1d`, `LoraConv2d`); non-empty, no duplicates | none: the struct is a container |
//! | `adaptable` | `["k_proj", ..]`: layer fields that can take adapters created at run time (`InitOptions::with_peft_config` / `with_config`) but get none from `init_adapter`; non-empty, no duplicates, not also in `targets` | none |
//! | `rank` | integer literal `>= 1`: the inner dimension `r` of `A [r, in]` and `B [out, r]` | required with `targets` |
//! | `alpha` | integer or float literal `> 0`: the adapter is scaled by `alpha / rank` | `8`, as in PEFT |
//! | `dropout` | float literal in `[0, 1)`: dropout on the adapter's input while training | `0` |
//! | `rslora` | `true` or `false` (`rslora` alone means `true`): scale by `alpha / sqrt(rank)` | `false` |
//! | `dora` | `true` or `false` (`dora` alone means `true`): DoRA adapters, with a trained magnitude per output feature (PEFT's `use_dora`); linear targets only (an `Embedding` or convolution target with `dora` is an error) | `false` |
//! | `init` | `"kaiming"` or `"gaussian"`: how `A` is initialised (`B` starts at zero) | `"kaiming"` |
//! | `crate` | a path in a string, e.g. `"lora_runtime"` when depending on the runtime directly | `"::lora"` |
//!
//! `#[lora]` without arguments marks a container: a struct whose LoRA layers all sit in nested
//! fields. `rank`, `alpha`, `dropout`, `rslora`, `dora` and `init` without `targets` are errors, since
//! they would have no effect.
//!
//! # Field arguments
//!
//! `#[lora(nested)]` marks a field that is itself a LoRA model: a struct with `#[lora]`, or a
//! `Vec`, `Option`, `Box` or array of them (list elements are named by their index). Fields are
//! visited in declaration order.
//!
//! # Errors
//!
//! Every mistake is reported in one compilation, each at the token at fault: unknown, repeated or
//! out-of-range arguments, unknown or repeated targets (with a suggestion for a likely typo),
//! targets that are not layers LoRA can adapt, nested fields that are not LoRA models, and items other
//! than a struct with named fields. The struct is then emitted unchanged, so a mistake in the
//! attribute does not cascade into errors elsewhere.
#![warn(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod ast;
mod ctxt;
mod expand;
mod fallback;
mod valid;

/// Adds LoRA adapters to a struct's linear, embedding and convolution layers; see the [crate]
/// documentation.
#[proc_macro_attribute]
pub fn lora(
    attr: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    expand::lora(attr.into(), item.into()).into()
}
