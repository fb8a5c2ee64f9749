//! Hub ids resolve through a Hugging Face cache laid out as `huggingface_hub` writes it, with
//! no network: a complete snapshot loads, an incomplete one offline is a named error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lora_models::hub::{resolve_model_with, HubOptions};
use lora_models::{ModelError, Pretrained, TextTokenizer};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llm")
}

/// `hub/models--test-org--tiny-llama/{refs/main, snapshots/<sha>/...}` with tiny-llama's config
/// and weights and a tokenizer.json saved from the tiny GGUF's tokenizer.
fn cache_with_tiny_llama(root: &Path, with_weights: bool) -> PathBuf {
    let hub = root.join("hub");
    let repo = hub.join("models--test-org--tiny-llama");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(sha);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let src = fixtures().join("tiny-llama");
    std::fs::copy(src.join("config.json"), snapshot.join("config.json")).unwrap();
    if with_weights {
        std::fs::copy(
            src.join("model.safetensors"),
            snapshot.join("model.safetensors"),
        )
        .unwrap();
    }
    let gguf = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
    let mut file = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content, &gguf).unwrap();
    tokenizer
        .inner()
        .save(snapshot.join("tokenizer.json"), false)
        .unwrap();
    let eos = tokenizer.id_to_token(2).unwrap();
    let config = serde_json::json!({"bos_token": null, "eos_token": eos});
    std::fs::write(snapshot.join("tokenizer_config.json"), config.to_string()).unwrap();
    hub
}

#[test]
fn a_hub_id_in_the_cache_resolves_to_its_snapshot_and_loads() {
    let root = tempfile::tempdir().unwrap();
    let hub = cache_with_tiny_llama(root.path(), true);
    let options = HubOptions {
        cache_dir: hub.clone(),
        offline: true,
    };
    let dir = resolve_model_with("test-org/tiny-llama", &options).unwrap();
    assert!(
        dir.starts_with(&hub) && dir.join("config.json").is_file(),
        "{dir:?}"
    );
    let pretrained = Pretrained::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(pretrained.model.config().vocab_size, 256);
    assert_eq!(pretrained.tokenizer.encode("ab").unwrap(), [97, 98]);
    // An existing path is a path, whatever it looks like.
    let local = fixtures().join("tiny-llama");
    assert_eq!(
        resolve_model_with(local.to_str().unwrap(), &options).unwrap(),
        local
    );
}

#[test]
fn missing_models_offline_and_non_ids_are_named_errors() {
    let root = tempfile::tempdir().unwrap();
    let hub = cache_with_tiny_llama(root.path(), false);
    let options = HubOptions {
        cache_dir: hub,
        offline: true,
    };
    for id in [
        "test-org/tiny-llama",
        "test-org/absent",
        "test-org/tiny-llama@v2",
    ] {
        let err = resolve_model_with(id, &options).unwrap_err();
        assert!(matches!(&err, ModelError::Hub { .. }), "{id}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains(id) && text.contains("HF_HUB_OFFLINE"),
            "{text}"
        );
    }
    let err = resolve_model_with("no/such/model.gguf", &options).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/model.gguf"), "{err}");
}
