//! Llama-family decoders (Llama 1-3, SmolLM2, Qwen2): RMSNorm, RoPE (with Llama-3 scaling),
//! grouped-query attention, SwiGLU MLP, tied or untied embeddings, optional q/k/v bias.
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use lora_models::llama::load_llama;
//! let model = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), DType::F32, &Device::Cpu)?;
//! let ids = Tensor::new(&[[1u32, 9690, 198]], &Device::Cpu)?;
//! let logits = model.forward(&ids, &mut model.new_cache())?; // [1, 3, 49152]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod batch;
mod config;
mod finetune;
mod load;
mod model;

pub use batch::SeqCache;
pub use config::{Llama3RopeScaling, LlamaConfig, RopeScaling};
pub(crate) use load::{
    float_only, gguf_name, load_gguf_content, open_gguf, permute, qtensor_of, read_raw,
    stored_fingerprint, tensor_error, tensor_info, GgufArch,
};
pub use load::{load_gguf, load_hf_dir, load_llama, Checkpoint, Precision};
pub use model::{
    Attention, Cache, DecoderLayer, LlamaForCausalLM, LlamaModel, Mlp, TokenEmbedding,
};
