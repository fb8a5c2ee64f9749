//! The tokenizer and chat template of a real model, SmolLM2-135M-Instruct (GGUF), against the ids
//! and prompts transformers 5.24 produces from the same file (`tests/fixtures/llm/smollm2.json`).
//!
//! The model is not in the repository: `scripts/fetch-smollm2.sh` puts it in the local cache
//! (or point `LORA_SMOLLM2` at the `.gguf`). Without it these tests print `skipped: ...` and pass,
//! unless `LORA_REQUIRE_MODELS=1`, when they fail.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use lora_models::{render_chat, Message, TextTokenizer};
use serde::Deserialize;

/// The `.gguf` (see `lora_models::cache`), or `None` after saying why it is skipped.
fn gguf_or_skip(test: &str) -> Option<PathBuf> {
    lora_models::cache::smollm2_or_skip(test).unwrap()
}

/// The tokenizer of the GGUF, or `None` as [`gguf_or_skip`].
fn smollm2(test: &str) -> Option<TextTokenizer> {
    let path = gguf_or_skip(test)?;
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Some(TextTokenizer::from_gguf(&content, &path).unwrap())
}

#[derive(Deserialize)]
struct Fixture {
    bos_token_id: u32,
    eos_token_id: u32,
    vocab_size: usize,
    /// transformers' `backend_tokenizer` pieces, as `tokenizer.json` writes them.
    tokenizer_pipeline: serde_json::Value,
    chat_template: String,
    tokenizer_cases: Vec<TokenizerCase>,
    chat_cases: Vec<ChatCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
    rendered: String,
    prompt_ids: Vec<u32>,
    /// What the model generated greedily after the prompt, and transformers' decode of it.
    #[serde(default)]
    greedy_ids: Vec<u32>,
    #[serde(default)]
    greedy_text: Option<String>,
}

fn yes() -> bool {
    true
}

/// A reference file of `tests/fixtures/llm/` at the workspace root (or beside this crate).
fn fixture_file(name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    [
        manifest.join("../tests/fixtures/llm"),
        manifest.join("tests/fixtures/llm"),
    ]
    .into_iter()
    .map(|dir| dir.join(name))
    .find(|path| path.is_file())
    .unwrap_or_else(|| {
        panic!(
            "tests/fixtures/llm/{name} not found from {}",
            manifest.display()
        )
    })
}

/// Reference data written by transformers 5.24 (`LORA_SMOLLM2_FIXTURE` overrides).
fn fixture() -> Fixture {
    let path = std::env::var_os("LORA_SMOLLM2_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixture_file("smollm2.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn metadata_gives_the_special_tokens_and_the_template() {
    let Some(tok) = smollm2("metadata_gives_the_special_tokens_and_the_template") else {
        return;
    };
    let fixture = fixture();
    assert_eq!(tok.vocab_size(), fixture.vocab_size);
    assert_eq!(tok.bos_token_id(), Some(fixture.bos_token_id));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(
        (tok.eos_token_id(), tok.eos_token()),
        (fixture.eos_token_id, "<|im_end|>")
    );
    assert_eq!(tok.stop_token_ids(), &[fixture.eos_token_id]);
    assert!(!tok.add_bos_token());
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.chat_template(), Some(fixture.chat_template.as_str()));
}

#[test]
fn the_pipeline_is_the_one_transformers_builds() {
    let Some(tok) = smollm2("the_pipeline_is_the_one_transformers_builds") else {
        return;
    };
    let expected = fixture().tokenizer_pipeline;
    let ours: serde_json::Value =
        serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
    for piece in ["normalizer", "pre_tokenizer", "decoder"] {
        assert_eq!(ours[piece], expected[piece], "{piece}");
    }
    for (field, value) in expected["model"].as_object().unwrap() {
        assert_eq!(&ours["model"][field], value, "model.{field}");
    }
    assert_eq!(
        ours["model"]["merges"].as_array().unwrap().len() as u64,
        expected["merges"].as_u64().unwrap()
    );
    let special: Vec<serde_json::Value> = ours["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"] == true)
        .map(|t| serde_json::json!([t["id"], t["content"]]))
        .collect();
    assert_eq!(
        serde_json::Value::Array(special),
        expected["special_tokens"]
    );
}

#[test]
fn ids_match_transformers() {
    let Some(tok) = smollm2("ids_match_transformers") else {
        return;
    };
    let fixture = fixture();
    assert!(fixture.tokenizer_cases.len() >= 10);
    for case in &fixture.tokenizer_cases {
        assert_eq!(
            tok.encode(&case.text).unwrap(),
            case.ids,
            "text {:?}",
            case.text
        );
    }
}

#[test]
fn decode_inverts_encode() {
    let Some(tok) = smollm2("decode_inverts_encode") else {
        return;
    };
    for case in &fixture().tokenizer_cases {
        assert_eq!(
            tok.decode(&case.ids).unwrap(),
            case.text,
            "ids {:?}",
            case.ids
        );
    }
}

#[test]
fn streamed_text_is_the_decoded_text() {
    let Some(tok) = smollm2("streamed_text_is_the_decoded_text") else {
        return;
    };
    let fixture = fixture();
    let prompts = fixture.chat_cases.iter().map(|c| &c.prompt_ids);
    for ids in fixture
        .tokenizer_cases
        .iter()
        .map(|c| &c.ids)
        .chain(prompts)
    {
        let mut stream = tok.stream();
        let mut text = String::new();
        for &id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.is_empty());
                assert!(
                    !piece.ends_with('\u{FFFD}'),
                    "a piece ends mid-character: {piece:?}"
                );
                text.push_str(&piece);
            }
        }
        text.push_str(&stream.finish().unwrap().unwrap_or_default());
        assert_eq!(text, tok.decode(ids).unwrap(), "ids {ids:?}");
    }
}

#[test]
fn a_split_character_waits_for_its_last_byte() {
    let Some(tok) = smollm2("a_split_character_waits_for_its_last_byte") else {
        return;
    };
    // "😀" is four bytes; SmolLM2 spells it in two tokens.
    let ids = tok.encode("😀").unwrap();
    assert!(ids.len() >= 2, "{ids:?}");
    let mut stream = tok.stream();
    let pieces: Vec<_> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert!(
        pieces[..ids.len() - 1].iter().all(Option::is_none),
        "{pieces:?}"
    );
    assert_eq!(pieces.last().unwrap().as_deref(), Some("😀"));
    assert_eq!(stream.finish().unwrap(), None);

    // A stream cut mid-character ends in U+FFFD, as `decode` writes it.
    let mut stream = tok.stream();
    assert_eq!(stream.push(ids[0]).unwrap(), None);
    assert_eq!(
        stream.finish().unwrap(),
        Some(tok.decode(&ids[..1]).unwrap())
    );
}

#[test]
fn chat_text_matches_transformers() {
    // No model needed: the template and the special tokens' text are in the fixture.
    let fixture = fixture();
    assert!(!fixture.chat_cases.is_empty());
    for case in &fixture.chat_cases {
        let rendered = render_chat(
            &fixture.chat_template,
            &case.messages,
            case.add_generation_prompt,
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap();
        assert_eq!(rendered, case.rendered);
    }
}

#[test]
fn chat_prompt_ids_match_transformers() {
    let Some(tok) = smollm2("chat_prompt_ids_match_transformers") else {
        return;
    };
    for case in &fixture().chat_cases {
        let rendered = tok
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, case.rendered);
        assert_eq!(
            tok.encode_raw(&rendered).unwrap(),
            case.prompt_ids,
            "prompt {rendered:?}"
        );
        assert_eq!(
            tok.encode(&rendered).unwrap(),
            case.prompt_ids,
            "SmolLM2 adds no BOS"
        );
        assert_eq!(tok.decode(&case.prompt_ids).unwrap(), case.rendered);
        if let Some(text) = &case.greedy_text {
            assert_eq!(&tok.decode(&case.greedy_ids).unwrap(), text);
        }
    }
}

#[test]
fn a_saved_tokenizer_json_loads_back_the_same() {
    let Some(tok) = smollm2("a_saved_tokenizer_json_loads_back_the_same") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("lora-models-hf-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tok.inner().save(dir.join("tokenizer.json"), false).unwrap();
    // transformers 5 writes the template beside the config and the tokens as strings; older
    // versions wrote `{"content": ...}` objects. Stop ids come from generation_config.json.
    std::fs::write(
        dir.join("chat_template.jinja"),
        tok.chat_template().unwrap(),
    )
    .unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true, "__type": "AddedToken"},
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
    )
    .unwrap();

    let loaded = TextTokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let loaded = loaded.unwrap();
    assert_eq!((loaded.bos_token_id(), loaded.eos_token_id()), (Some(1), 2));
    assert_eq!(loaded.stop_token_ids(), &[2, 0]);
    assert!(!loaded.add_bos_token());
    assert_eq!(loaded.chat_template(), tok.chat_template());
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    let fixture = fixture();
    for case in &fixture.tokenizer_cases {
        assert_eq!(
            loaded.encode(&case.text).unwrap(),
            case.ids,
            "text {:?}",
            case.text
        );
    }
    for case in &fixture.chat_cases {
        let rendered = loaded
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(loaded.encode_raw(&rendered).unwrap(), case.prompt_ids);
    }
}

#[test]
fn a_hugging_face_dir_from_transformers_loads() {
    // Optional: a directory written by transformers' `save_pretrained` (LORA_SMOLLM2_HF_DIR).
    let Some(dir) = std::env::var_os("LORA_SMOLLM2_HF_DIR").map(PathBuf::from) else {
        eprintln!("a_hugging_face_dir_from_transformers_loads: skipped: set LORA_SMOLLM2_HF_DIR");
        return;
    };
    let tok = TextTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id(), tok.add_bos_token()),
        (Some(1), 2, false)
    );
    let fixture = fixture();
    assert_eq!(tok.chat_template(), Some(fixture.chat_template.as_str()));
    for case in &fixture.tokenizer_cases {
        assert_eq!(
            tok.encode(&case.text).unwrap(),
            case.ids,
            "text {:?}",
            case.text
        );
    }
}

#[derive(Deserialize)]
struct PreSplitCase {
    pre: String,
    text: String,
    pieces: Vec<String>,
    ids: Vec<u32>,
}

#[test]
fn named_pre_tokenizer_splits_match_transformers() {
    // scripts/pre_split_fixture.py: SmolLM2's vocabulary with `tokenizer.ggml.pre` set to the
    // names transformers has a split regex for.
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    let Some(path) = gguf_or_skip("named_pre_tokenizer_splits_match_transformers") else {
        return;
    };
    let fixture = fixture_file("smollm2_pre_splits.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let cases: Vec<PreSplitCase> = serde_json::from_value(fixture["cases"].clone()).unwrap();
    let mut content = gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    for pre in ["llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"] {
        let value = gguf_file::Value::String(pre.to_string());
        content
            .metadata
            .insert("tokenizer.ggml.pre".to_string(), value);
        let tok = TextTokenizer::from_gguf(&content, &path).unwrap();
        let pre_tokenizer = tok.inner().get_pre_tokenizer().unwrap();
        let mut checked = 0;
        for case in cases.iter().filter(|c| c.pre == pre) {
            let mut split = PreTokenizedString::from(case.text.as_str());
            pre_tokenizer.pre_tokenize(&mut split).unwrap();
            let pieces: Vec<String> = split
                .get_splits(OffsetReferential::Original, OffsetType::Char)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect();
            assert_eq!(pieces, case.pieces, "{pre}: text {:?}", case.text);
            assert_eq!(
                tok.encode(&case.text).unwrap(),
                case.ids,
                "{pre}: text {:?}",
                case.text
            );
            checked += 1;
        }
        assert!(checked > 10, "{pre}: {checked} cases");
    }
}
