//! Text tokenizers: byte-level BPE rebuilt from a GGUF file's metadata, or a Hugging Face model
//! directory's `tokenizer.json`.
//!
//! [`TextTokenizer::from_gguf`] builds exactly the tokenizer transformers builds from the same file
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so ids match token for token:
//!
//! ```no_run
//! use std::path::Path;
//! use candle_core::quantized::gguf_file;
//! use lora_models::TextTokenizer;
//!
//! let path = Path::new("SmolLM2-135M-Instruct.Q4_1.gguf");
//! let content = gguf_file::Content::read(&mut std::fs::File::open(path)?)?;
//! let tokenizer = TextTokenizer::from_gguf(&content, path)?;
//!
//! let ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")?; // special tokens stay whole
//! assert_eq!(ids[0], 1);
//! assert_eq!(tokenizer.decode(&ids)?, "<|im_start|>user\nHi<|im_end|>");
//!
//! // Streaming: text comes out as soon as it is complete UTF-8.
//! let mut stream = tokenizer.stream();
//! for id in ids {
//!     if let Some(text) = stream.push(id)? {
//!         print!("{text}");
//!     }
//! }
//! if let Some(rest) = stream.finish()? {
//!     print!("{rest}");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::Value as Json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizer::SplitDelimiterBehavior;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::chat::{render_chat, Message};
use crate::error::ModelError;

/// GGUF metadata keys the tokenizer is rebuilt from (llama.cpp's names).
mod key {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Llama 3's split regex (transformers' `_LLAMA3_SPLIT`).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// Qwen2's (`Qwen2Tokenizer`'s `PRETOKENIZE_REGEX`): digits one by one.
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// Qwen3.5's: combining marks stay with their letters.
const QWEN35_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// Mistral's Tekken: words split at case changes.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);
/// GPT-4o's (`o200k`): Tekken's case split with contractions attached, digits in threes.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// The split regex transformers 5.24 puts in front of the byte-level BPE for a
/// `tokenizer.ggml.pre` (`GGUF_PRE_TOKENIZER_SPLITS`). `None` (every other name, `smollm` and
/// `gpt-2` among them) means GPT-2's own regex, inside `ByteLevel`.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// A special token: its id and its text (what chat templates see as `bos_token` / `eos_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialToken {
    id: u32,
    text: String,
}

/// A tokenizer for text generation: `tokenizers`' [`Tokenizer`] plus the special tokens and the
/// chat template that came with it.
///
/// Build it with [`from_gguf`](Self::from_gguf) or [`from_hf_dir`](Self::from_hf_dir); turn text
/// into ids with [`encode`](Self::encode) and back with [`decode`](Self::decode) or, one token at a
/// time, with [`stream`](Self::stream).
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<SpecialToken>,
    eos: SpecialToken,
    stop_token_ids: Vec<u32>,
    add_bos_token: bool,
    chat_template: Option<String>,
    source: PathBuf,
}

impl TextTokenizer {
    /// Rebuilds the tokenizer a GGUF file describes in its `tokenizer.*` metadata.
    ///
    /// Only byte-level BPE (`tokenizer.ggml.model = gpt2`: GPT-2, Llama 3, Qwen, SmolLM, ...) is
    /// supported. What is built is what transformers 5.24 builds from the same file: the
    /// vocabulary `tokenizer.ggml.tokens` (id = position) and the merges `tokenizer.ggml.merges`,
    /// GPT-2's byte-level pre-tokenizer and decoder, no normalizer; the tokens
    /// `tokenizer.ggml.token_type` marks as control (type 3) become special added tokens, so
    /// `<|im_start|>` written in text is one token, and user-defined ones (type 4) plain added
    /// tokens. Where `tokenizer.ggml.pre` names a split transformers knows (`llama-bpe`, `qwen2`,
    /// `qwen35`, `tekken`, `gpt-4o` and their aliases), that regex cuts the text before the byte
    /// mapping; any other value, SmolLM2's `smollm` among them, keeps GPT-2's regex, as in
    /// transformers.
    ///
    /// `path` is only used in error messages.
    ///
    /// # Errors
    ///
    /// [`ModelError::UnsupportedTokenizer`] for another `tokenizer.ggml.model`;
    /// [`ModelError::MissingMetadata`] when the tokens, merges or end-of-sequence id are absent;
    /// [`ModelError::InvalidField`] for a value of the wrong type, a special-token id outside the
    /// vocabulary or a malformed merge; [`ModelError::Tokenizer`] when `tokenizers` refuses the
    /// vocabulary (a merge naming an unknown token).
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self, ModelError> {
        let spec = GgufTokenizer::read(&Metadata { content, path })?;
        let inner = spec
            .byte_level_bpe()
            .map_err(|source| ModelError::Tokenizer {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            inner,
            stop_token_ids: vec![spec.eos.id],
            add_bos_token: spec.add_bos_token,
            bos: spec.bos,
            eos: spec.eos,
            chat_template: spec.chat_template,
            source: path.to_path_buf(),
        })
    }

    /// Loads a Hugging Face model directory's tokenizer: `tokenizer.json`, plus
    /// `tokenizer_config.json` and `generation_config.json` when present.
    ///
    /// - The chat template comes from `chat_template.jinja`, else `tokenizer_config.json`'s
    ///   `chat_template` (a string, or a list of `{name, template}` of which `default` is taken),
    ///   else `chat_template.json`.
    /// - `bos_token` and `eos_token` come from `tokenizer_config.json` (a string or an
    ///   `{"content": ...}` object), resolved to ids through the vocabulary; where absent,
    ///   `generation_config.json`'s `bos_token_id` / `eos_token_id` (the first, for a list).
    /// - The stop ids are the end-of-sequence id followed by every id of `generation_config.json`'s
    ///   `eos_token_id` (Llama 3 lists three).
    /// - `add_bos_token` is `tokenizer_config.json`'s, or else whether `tokenizer.json`'s
    ///   post-processor puts the beginning-of-sequence token in front of the text.
    ///
    /// # Errors
    ///
    /// [`ModelError::Io`] when `tokenizer.json` cannot be read, [`ModelError::Tokenizer`] when it
    /// is not a tokenizer, [`ModelError::Json`] for an unparsable config,
    /// [`ModelError::InvalidField`] for a field of the wrong shape, [`ModelError::UnknownToken`]
    /// for a special token outside the vocabulary and [`ModelError::MissingEosToken`] when no
    /// file names an end-of-sequence token.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tokenizer_path).map_err(|source| ModelError::Io {
            path: tokenizer_path.clone(),
            source,
        })?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|source| ModelError::Tokenizer {
            path: tokenizer_path,
            source,
        })?;
        let configs = HfConfigs::read(dir, &inner)?;

        let generation_eos = configs.generation_ids("eos_token_id")?;
        let eos = match (configs.special_token("eos_token")?, generation_eos.first()) {
            (Some(eos), _) => eos,
            (None, Some(&id)) => configs.token_of_id("eos_token_id", id)?,
            (None, None) => {
                return Err(ModelError::MissingEosToken {
                    path: dir.to_path_buf(),
                })
            }
        };
        let generation_bos = configs.generation_ids("bos_token_id")?;
        let bos = match (configs.special_token("bos_token")?, generation_bos.first()) {
            (Some(bos), _) => Some(bos),
            (None, Some(&id)) => Some(configs.token_of_id("bos_token_id", id)?),
            (None, None) => None,
        };
        let mut stop_token_ids = vec![eos.id];
        for id in generation_eos {
            if !stop_token_ids.contains(&id) {
                stop_token_ids.push(id);
            }
        }
        let add_bos_token = match (configs.flag("add_bos_token")?, &bos) {
            (_, None) => false,
            (Some(flag), Some(_)) => flag,
            // Not stated: whether `tokenizer.json`'s post-processor adds it (Llama 3's does).
            (None, Some(bos)) => {
                let probe = inner
                    .encode("", true)
                    .map_err(|source| ModelError::Encode { source })?;
                probe.get_ids().first() == Some(&bos.id)
            }
        };
        let chat_template = configs.chat_template(dir)?;

        Ok(Self {
            inner,
            bos,
            eos,
            stop_token_ids,
            add_bos_token,
            chat_template,
            source: dir.to_path_buf(),
        })
    }

    /// The ids of `text`, as transformers' `encode(text, add_special_tokens=False)`, with the
    /// beginning-of-sequence id in front when the tokenizer says to add it ([`add_bos_token`](Self::add_bos_token)).
    ///
    /// Special tokens written in the text (`<|im_start|>`) become their single id. A rendered chat
    /// template writes its own beginning-of-sequence token: encode it with
    /// [`encode_raw`](Self::encode_raw) to avoid a second one.
    ///
    /// # Errors
    ///
    /// [`ModelError::Encode`] when `tokenizers` fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let ids = self.encode_raw(text)?;
        Ok(match &self.bos {
            Some(bos) if self.add_bos_token => std::iter::once(bos.id).chain(ids).collect(),
            _ => ids,
        })
    }

    /// The ids of `text` and nothing else, as transformers' `encode(text, add_special_tokens=False)`
    /// (what `apply_chat_template(..., tokenize=True)` does with the rendered prompt).
    ///
    /// # Errors
    ///
    /// [`ModelError::Encode`] when `tokenizers` fails.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|source| ModelError::Encode { source })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included, as transformers' `decode(ids)`.
    ///
    /// Bytes that are not valid UTF-8 (a character cut between tokens) become U+FFFD; ids outside
    /// the vocabulary are skipped, as `tokenizers` does.
    ///
    /// # Errors
    ///
    /// [`ModelError::Decode`] when `tokenizers` fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, false)
            .map_err(|source| ModelError::Decode { source })
    }

    /// A decoder for ids arriving one at a time (generation), handing out text as it completes.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Renders the chat template over `messages` with this tokenizer's special tokens, as
    /// transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    /// Tokenize the result with [`encode_raw`](Self::encode_raw).
    ///
    /// # Errors
    ///
    /// [`ModelError::MissingMetadata`] when the tokenizer came without a chat template;
    /// [`ModelError::Template`] when the template fails (see [`render_chat`]).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template =
            self.chat_template
                .as_deref()
                .ok_or_else(|| ModelError::MissingMetadata {
                    path: self.source.clone(),
                    key: "chat_template".to_string(),
                })?;
        let bos = self.bos.as_ref().map_or("", |bos| bos.text.as_str());
        render_chat(
            template,
            messages,
            add_generation_prompt,
            bos,
            &self.eos.text,
        )
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` (special tokens, `add_bos_token`, the
    /// chat template) and `generation_config.json` (the stop ids) into `dir`:
    /// what [`from_hf_dir`](Self::from_hf_dir) and transformers' `AutoTokenizer` read back into
    /// this tokenizer.
    ///
    /// # Errors
    /// [`ModelError::Io`] or [`ModelError::Tokenizer`] naming the file.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|source| ModelError::Tokenizer {
                path: path.clone(),
                source,
            })?;
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos.as_ref().map(|b| b.text.clone()),
            "eos_token": self.eos.text,
            "pad_token": self.eos.text,
            "add_bos_token": self.add_bos_token,
            "chat_template": self.chat_template,
        });
        let generation = serde_json::json!({
            "bos_token_id": self.bos_token_id(),
            "eos_token_id": self.stop_token_ids,
        });
        for (name, value) in [
            ("tokenizer_config.json", config),
            ("generation_config.json", generation),
        ] {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(&value).map_err(|source| ModelError::Json {
                path: path.clone(),
                source,
            })?;
            std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        }
        Ok(())
    }

    /// The beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|bos| bos.id)
    }

    /// The beginning-of-sequence token's text (`bos_token` in chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|bos| bos.text.as_str())
    }

    /// The end-of-sequence id (`<|im_end|>`, 2, for SmolLM2).
    pub fn eos_token_id(&self) -> u32 {
        self.eos.id
    }

    /// The end-of-sequence token's text (`eos_token` in chat templates).
    pub fn eos_token(&self) -> &str {
        &self.eos.text
    }

    /// The ids that end generation: the end-of-sequence id first, then any others the model's
    /// `generation_config.json` lists.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// Whether [`encode`](Self::encode) puts the beginning-of-sequence id in front (false for SmolLM2).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The Jinja chat template that came with the tokenizer, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The number of ids, added tokens included (49152 for SmolLM2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text, e.g. `"<|im_end|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of one id, as the vocabulary spells it (byte-level: `Ġ` for a space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` tokenizer, for offsets, batches or serialization.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Decodes ids arriving one at a time, from [`TextTokenizer::stream`].
///
/// A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK), so
/// text is handed out only once it is complete: each [`push`](Self::push) decodes a short window of
/// ids with and without the new one and returns the difference, unless that ends in U+FFFD.
/// [`finish`](Self::finish) returns what is left. Concatenated, the pieces are exactly
/// [`TextTokenizer::decode`] of all the ids.
#[derive(Debug, Clone)]
pub struct TokenStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// End of the text already handed out.
    read_offset: usize,
}

impl TokenStream<'_> {
    /// Adds one id; returns the text it completes, if any.
    ///
    /// # Errors
    ///
    /// [`ModelError::Decode`] when `tokenizers` fails.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, ModelError> {
        self.ids.push(id);
        let (prefix, full) = self.window()?;
        if full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(None); // an incomplete character: wait for its next bytes
        }
        let Some(new) = new_text(&prefix, &full) else {
            return Ok(None);
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok((!new.is_empty()).then(|| new.to_string()))
    }

    /// Ends the stream; returns the text not handed out yet (an incomplete character at the end
    /// comes out as U+FFFD, as [`TextTokenizer::decode`] writes it).
    ///
    /// # Errors
    ///
    /// [`ModelError::Decode`] when `tokenizers` fails.
    pub fn finish(self) -> Result<Option<String>, ModelError> {
        let (prefix, full) = self.window()?;
        let rest = new_text(&prefix, &full).unwrap_or(&full);
        Ok((!rest.is_empty()).then(|| rest.to_string()))
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The window decoded without and with the ids not handed out yet.
    fn window(&self) -> Result<(String, String), ModelError> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        Ok((prefix, full))
    }
}

/// What `full` adds to `prefix`, when `full` extends it.
fn new_text<'f>(prefix: &str, full: &'f str) -> Option<&'f str> {
    full.strip_prefix(prefix)
}

/// The post-processor transformers 5 installs (`TokenizersBackend.update_post_processor`):
/// `[bos] $A [eos]`, each only when the tokenizer adds it.
fn special_tokens_template(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> Result<TemplateProcessing, tokenizers::Error> {
    let piece = |token: Option<&SpecialToken>, type_id: u32| {
        token
            .map(|t| format!("{}:{type_id} ", t.text))
            .unwrap_or_default()
    };
    let tail = |token: Option<&SpecialToken>, type_id: u32| {
        token
            .map(|t| format!(" {}:{type_id}", t.text))
            .unwrap_or_default()
    };
    let single = format!("{}$A:0{}", piece(bos, 0), tail(eos, 0));
    let pair = format!("{single} {}$B:1{}", piece(bos, 1), tail(eos, 1));
    let special: Vec<(String, u32)> = bos
        .into_iter()
        .chain(eos)
        .map(|t| (t.text.clone(), t.id))
        .collect();
    TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(special)
        .build()
        .map_err(Into::into)
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the other 68 map to U+0100.. in byte order.
fn byte_to_char(byte: u8) -> char {
    if is_printable_byte(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|b| !is_printable_byte(*b)).count();
    u32::try_from(rank)
        .ok()
        .and_then(|r| char::from_u32(0x100 + r))
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn is_printable_byte(byte: u8) -> bool {
    matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Whether every character of `token` is one of the 256 byte-level characters.
fn is_byte_level_text(token: &str) -> bool {
    token.chars().all(|c| {
        let code = u32::from(c);
        (0x100..0x100 + 68).contains(&code) || u8::try_from(code).is_ok_and(is_printable_byte)
    })
}

/// A vocabulary entry as the merges spell it: itself when already byte-level text, else its UTF-8
/// bytes through [`byte_to_char`] (transformers' `byte_level_tokenizer`).
fn byte_level_spelling(token: &str) -> String {
    if is_byte_level_text(token) {
        token.to_string()
    } else {
        token.bytes().map(byte_to_char).collect()
    }
}

/// What a GGUF file's metadata says about its byte-level tokenizer, read and checked.
struct GgufTokenizer<'a> {
    /// `tokenizer.ggml.pre`, naming the split regex.
    pre: Option<&'a str>,
    tokens: Vec<&'a str>,
    merges: Vec<(String, String)>,
    token_types: Vec<i64>,
    bos: Option<SpecialToken>,
    eos: SpecialToken,
    add_bos_token: bool,
    add_eos_token: bool,
    chat_template: Option<String>,
}

impl<'a> GgufTokenizer<'a> {
    fn read(meta: &Metadata<'a>) -> Result<Self, ModelError> {
        let model = meta.required(key::MODEL, Metadata::string)?;
        if model != "gpt2" {
            return Err(ModelError::UnsupportedTokenizer {
                path: meta.path.to_path_buf(),
                found: model.to_string(),
            });
        }
        let pre = meta.optional(key::PRE, Metadata::string)?;
        let tokens = meta.required(key::TOKENS, Metadata::strings)?;
        // A vocabulary of single tokens has no merges, and gguf-py drops an empty array: a
        // missing key is an empty list (transformers then builds the same merge-less BPE).
        let merges = meta
            .optional(key::MERGES, Metadata::strings)?
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(
                |(i, merge)| match merge.split(' ').collect::<Vec<_>>()[..] {
                    [left, right] => Ok((left.to_string(), right.to_string())),
                    _ => Err(meta.invalid(
                        key::MERGES,
                        format!("entry {i} `{merge}` is not two tokens separated by one space"),
                    )),
                },
            )
            .collect::<Result<_, _>>()?;
        let token_types = meta
            .optional(key::TOKEN_TYPE, Metadata::integers)?
            .unwrap_or_default();
        let special = |key: &str| -> Result<Option<SpecialToken>, ModelError> {
            let Some(id) = meta.optional(key, Metadata::integer)? else {
                return Ok(None);
            };
            let text = usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| {
                    let count = tokens.len();
                    meta.invalid(
                        key,
                        format!("{id} is not a token id (the vocabulary has {count} tokens)"),
                    )
                })?;
            let id = u32::try_from(id)
                .map_err(|_| meta.invalid(key, format!("{id} is not a token id")))?;
            Ok(Some(SpecialToken {
                id,
                text: (*text).to_string(),
            }))
        };
        let bos = special(key::BOS)?;
        let eos = special(key::EOS)?.ok_or_else(|| ModelError::MissingMetadata {
            path: meta.path.to_path_buf(),
            key: key::EOS.to_string(),
        })?;
        // transformers drops the flag when there is no token to add.
        let add_bos_token = meta
            .optional(key::ADD_BOS, Metadata::flag)?
            .unwrap_or(false)
            && bos.is_some();
        let add_eos_token = meta
            .optional(key::ADD_EOS, Metadata::flag)?
            .unwrap_or(false);
        let chat_template = meta
            .optional(key::CHAT_TEMPLATE, Metadata::string)?
            .map(str::to_string);
        Ok(Self {
            pre,
            tokens,
            merges,
            token_types,
            bos,
            eos,
            add_bos_token,
            add_eos_token,
            chat_template,
        })
    }

    /// The tokenizer transformers 5 assembles (`GPT2Tokenizer` from `byte_level_tokenizer`, then
    /// `add_gguf_special_tokens` and `update_post_processor`).
    fn byte_level_bpe(&self) -> Result<Tokenizer, tokenizers::Error> {
        // The vocabulary keyed the way the merges spell tokens. llama.cpp writes byte-level text,
        // but a token whose bytes are not valid UTF-8 comes back raw; transformers respells those.
        let mut vocab = Vocab::default();
        for (id, token) in (0u32..).zip(&self.tokens) {
            vocab.insert(byte_level_spelling(token), id);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, self.merges.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
            .build()?;
        let mut tokenizer = Tokenizer::new(bpe);
        match self.pre.and_then(pre_tokenizer_split) {
            None => tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true))),
            Some(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )?;
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
                ])))
            }
        };
        tokenizer.with_decoder(Some(ByteLevel::default()));

        // Control tokens become special, so `<|im_start|>` in text is one token. One spelled
        // outside the byte alphabet is a llama.cpp mislabel and stays a plain vocabulary entry.
        let typed = |kind: i64| {
            let types = &self.token_types;
            self.tokens
                .iter()
                .zip(types)
                .filter(move |(_, t)| **t == kind)
                .map(|(token, _)| *token)
        };
        let control = typed(TOKEN_TYPE_CONTROL)
            .filter(|token| is_byte_level_text(token))
            .map(|token| AddedToken::from(token.to_string(), true).normalized(false))
            .collect::<Vec<_>>();
        tokenizer.add_special_tokens(control)?;
        let user_defined = typed(TOKEN_TYPE_USER_DEFINED)
            .filter(|token| tokenizer.token_to_id(token).is_some())
            .map(|token| AddedToken::from(token.to_string(), false).normalized(false))
            .collect::<Vec<_>>();
        tokenizer.add_tokens(user_defined)?;

        let bos = self.bos.as_ref().filter(|_| self.add_bos_token);
        let eos = Some(&self.eos).filter(|_| self.add_eos_token);
        tokenizer.with_post_processor(Some(special_tokens_template(bos, eos)?));
        Ok(tokenizer)
    }
}

/// Typed access to GGUF metadata, with errors that name the file and the key.
struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl<'a> Metadata<'a> {
    fn invalid(&self, key: &str, reason: String) -> ModelError {
        ModelError::InvalidField {
            path: self.path.to_path_buf(),
            field: key.to_string(),
            reason,
        }
    }

    fn optional<T>(
        &self,
        key: &str,
        read: impl FnOnce(&'a GgufValue) -> Result<T, String>,
    ) -> Result<Option<T>, ModelError> {
        self.content
            .metadata
            .get(key)
            .map(read)
            .transpose()
            .map_err(|reason| self.invalid(key, reason))
    }

    fn required<T>(
        &self,
        key: &str,
        read: impl FnOnce(&'a GgufValue) -> Result<T, String>,
    ) -> Result<T, ModelError> {
        self.optional(key, read)?
            .ok_or_else(|| ModelError::MissingMetadata {
                path: self.path.to_path_buf(),
                key: key.to_string(),
            })
    }

    fn string(value: &GgufValue) -> Result<&str, String> {
        match value {
            GgufValue::String(text) => Ok(text),
            other => Err(format!("expected a string, found {:?}", other.value_type())),
        }
    }

    fn strings(value: &GgufValue) -> Result<Vec<&str>, String> {
        match value {
            GgufValue::Array(items) => items.iter().map(Self::string).collect(),
            other => Err(format!(
                "expected an array of strings, found {:?}",
                other.value_type()
            )),
        }
    }

    fn integer(value: &GgufValue) -> Result<i64, String> {
        let int = match value {
            GgufValue::U8(v) => i64::from(*v),
            GgufValue::I8(v) => i64::from(*v),
            GgufValue::U16(v) => i64::from(*v),
            GgufValue::I16(v) => i64::from(*v),
            GgufValue::U32(v) => i64::from(*v),
            GgufValue::I32(v) => i64::from(*v),
            GgufValue::U64(v) => i64::try_from(*v).map_err(|_| format!("{v} is out of range"))?,
            GgufValue::I64(v) => *v,
            other => {
                return Err(format!(
                    "expected an integer, found {:?}",
                    other.value_type()
                ))
            }
        };
        Ok(int)
    }

    fn integers(value: &GgufValue) -> Result<Vec<i64>, String> {
        match value {
            GgufValue::Array(items) => items.iter().map(Self::integer).collect(),
            other => Err(format!(
                "expected an array of integers, found {:?}",
                other.value_type()
            )),
        }
    }

    fn flag(value: &GgufValue) -> Result<bool, String> {
        match value {
            GgufValue::Bool(flag) => Ok(*flag),
            other => Err(format!(
                "expected a boolean, found {:?}",
                other.value_type()
            )),
        }
    }
}

fn invalid(path: &Path, field: &str, reason: &str) -> ModelError {
    ModelError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

/// A Hugging Face directory's `tokenizer_config.json` and `generation_config.json` (each `null`
/// when absent), read against the vocabulary of its `tokenizer.json`.
struct HfConfigs<'t> {
    tokenizer: &'t Tokenizer,
    config: Json,
    config_path: PathBuf,
    generation: Json,
    generation_path: PathBuf,
}

impl<'t> HfConfigs<'t> {
    fn read(dir: &Path, tokenizer: &'t Tokenizer) -> Result<Self, ModelError> {
        let config_path = dir.join("tokenizer_config.json");
        let generation_path = dir.join("generation_config.json");
        Ok(Self {
            tokenizer,
            config: read_json_if_present(&config_path)?.unwrap_or(Json::Null),
            config_path,
            generation: read_json_if_present(&generation_path)?.unwrap_or(Json::Null),
            generation_path,
        })
    }

    /// `bos_token` / `eos_token` of `tokenizer_config.json`: a string or `{"content": ...}`.
    fn special_token(&self, field: &str) -> Result<Option<SpecialToken>, ModelError> {
        let text = match self.config.get(field) {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(text)) => text,
            Some(value) => match value.get("content") {
                Some(Json::String(text)) => text,
                _ => {
                    let reason = "expected a string or an object with a string `content`";
                    return Err(invalid(&self.config_path, field, reason));
                }
            },
        };
        let id = self
            .tokenizer
            .token_to_id(text)
            .ok_or_else(|| ModelError::UnknownToken {
                path: self.config_path.clone(),
                field: field.to_string(),
                token: text.clone(),
            })?;
        Ok(Some(SpecialToken {
            id,
            text: text.clone(),
        }))
    }

    /// A boolean of `tokenizer_config.json`, if stated.
    fn flag(&self, field: &str) -> Result<Option<bool>, ModelError> {
        match self.config.get(field) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Bool(flag)) => Ok(Some(*flag)),
            Some(_) => Err(invalid(&self.config_path, field, "expected true or false")),
        }
    }

    /// An id or list of ids of `generation_config.json` (empty when absent).
    fn generation_ids(&self, field: &str) -> Result<Vec<u32>, ModelError> {
        let ids = match self.generation.get(field) {
            None | Some(Json::Null) => return Ok(Vec::new()),
            Some(Json::Array(items)) => items.iter().collect(),
            Some(one) => vec![one],
        };
        ids.into_iter()
            .map(|id| {
                let id = id.as_u64().and_then(|id| u32::try_from(id).ok());
                let reason = "expected a token id or a list of token ids";
                id.ok_or_else(|| invalid(&self.generation_path, field, reason))
            })
            .collect()
    }

    /// The special token of an id `generation_config.json` names.
    fn token_of_id(&self, field: &str, id: u32) -> Result<SpecialToken, ModelError> {
        let text = self.tokenizer.id_to_token(id).ok_or_else(|| {
            let reason = format!("{id} is not a token id of `tokenizer.json`");
            invalid(&self.generation_path, field, &reason)
        })?;
        Ok(SpecialToken { id, text })
    }

    /// The chat template, where transformers looks for it: `chat_template.jinja`, then
    /// `tokenizer_config.json`, then `chat_template.json`.
    fn chat_template(&self, dir: &Path) -> Result<Option<String>, ModelError> {
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(text) => return Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ModelError::Io {
                    path: jinja_path,
                    source,
                })
            }
        }
        match self.config.get("chat_template") {
            None | Some(Json::Null) => {}
            Some(Json::String(text)) => return Ok(Some(text.clone())),
            Some(Json::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str);
                let reason = "a list of named templates without one named `default`";
                return default
                    .map(|text| Some(text.to_string()))
                    .ok_or_else(|| invalid(&self.config_path, "chat_template", reason));
            }
            Some(_) => {
                let reason = "expected a string or a list of `{name, template}`";
                return Err(invalid(&self.config_path, "chat_template", reason));
            }
        }
        let json_path = dir.join("chat_template.json");
        Ok(read_json_if_present(&json_path)?.and_then(|json| {
            json.get("chat_template")
                .and_then(Json::as_str)
                .map(str::to_string)
        }))
    }
}

/// A JSON file's contents, or `None` when the file does not exist.
fn read_json_if_present(path: &Path) -> Result<Option<Json>, ModelError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        let all: std::collections::HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(all.len(), 256);
        assert_eq!(all, ByteLevel::alphabet().into_iter().collect());
        assert!(all.iter().all(|c| is_byte_level_text(&c.to_string())));
    }

    #[test]
    fn raw_tokens_are_respelled() {
        assert_eq!(byte_level_spelling("Ġthe"), "Ġthe");
        assert_eq!(byte_level_spelling("\u{FFFD}"), "ï¿½");
        assert_eq!(byte_level_spelling("a b"), "aĠb");
    }

    /// A directory with a five-token `tokenizer.json` and the given config files.
    fn hf_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lora-models-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vocab: Vocab = [("<s>", 0), ("</s>", 1), ("a", 2), ("b", 3), ("ab", 4)]
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![("a".into(), "b".into())])
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .add_special_tokens(["<s>", "</s>"].map(|t| AddedToken::from(t, true)))
            .unwrap();
        tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    fn load(name: &str, files: &[(&str, &str)]) -> Result<TextTokenizer, ModelError> {
        let dir = hf_dir(name, files);
        let loaded = TextTokenizer::from_hf_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    #[test]
    fn hf_special_tokens_are_strings_or_objects() {
        let config = r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                         "add_bos_token": true, "chat_template": "{{ bos_token }}"}"#;
        let tok = load("objects", &[("tokenizer_config.json", config)]).unwrap();
        assert_eq!(
            (tok.bos_token(), tok.bos_token_id()),
            (Some("<s>"), Some(0))
        );
        assert_eq!((tok.eos_token(), tok.eos_token_id()), ("</s>", 1));
        assert_eq!(tok.stop_token_ids(), &[1]);
        assert_eq!(tok.encode("ab</s>").unwrap(), [0, 4, 1]);
        assert_eq!(tok.encode_raw("ab").unwrap(), [4]);
        assert_eq!(tok.chat_template(), Some("{{ bos_token }}"));
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "<s>");
    }

    #[test]
    fn hf_generation_config_adds_stop_ids() {
        let generation = r#"{"bos_token_id": 0, "eos_token_id": [3, 1, 3]}"#;
        let tok = load("generation", &[("generation_config.json", generation)]).unwrap();
        assert_eq!((tok.eos_token_id(), tok.eos_token()), (3, "b"));
        assert_eq!(tok.stop_token_ids(), &[3, 1]);
        assert_eq!(tok.bos_token_id(), Some(0));
        assert!(!tok.add_bos_token()); // the post-processor adds nothing
        assert_eq!(tok.chat_template(), None);
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(ModelError::MissingMetadata { key, .. }) if key == "chat_template"
        ));

        let config = r#"{"eos_token": "</s>"}"#;
        let generation = r#"{"eos_token_id": 3}"#;
        let files = [
            ("tokenizer_config.json", config),
            ("generation_config.json", generation),
        ];
        let tok = load("both", &files).unwrap();
        assert_eq!(tok.stop_token_ids(), &[1, 3]);
    }

    #[test]
    fn hf_named_templates_take_the_default() {
        let config = r#"{"eos_token": "</s>", "chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
        let tok = load("named", &[("tokenizer_config.json", config)]).unwrap();
        assert_eq!(tok.chat_template(), Some("D"));
        let files = [
            ("tokenizer_config.json", config),
            ("chat_template.jinja", "J"),
        ];
        assert_eq!(load("jinja", &files).unwrap().chat_template(), Some("J"));
    }

    #[test]
    fn hf_errors_name_the_file_and_field() {
        let err = load("no-eos", &[]).unwrap_err();
        assert!(matches!(err, ModelError::MissingEosToken { .. }), "{err}");
        let err = load(
            "unknown",
            &[("tokenizer_config.json", r#"{"eos_token": "<eos>"}"#)],
        )
        .unwrap_err();
        assert!(
            matches!(&err, ModelError::UnknownToken { field, token, .. } if field == "eos_token" && token == "<eos>"),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        let err = load("bad-json", &[("generation_config.json", "{")]).unwrap_err();
        assert!(matches!(err, ModelError::Json { .. }), "{err}");
        let generation = r#"{"eos_token_id": "two"}"#;
        let err = load("bad-id", &[("generation_config.json", generation)]).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidField { field, .. } if field == "eos_token_id"),
            "{err}"
        );
        let err = TextTokenizer::from_hf_dir(Path::new("/nonexistent/model")).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/model/tokenizer.json: "),
            "{err}"
        );
    }

    /// A GGUF with a toy byte-level vocabulary: `Ġ` is a space; `<|end|>` is control,
    /// `<think>` user-defined, `€` (raw, not byte-level text) respelled to `âĤ¬`.
    fn toy_gguf(extra: &[(&str, GgufValue)]) -> Content {
        use candle_core::quantized::gguf_file::VersionedMagic;
        let strings = |items: &[&str]| {
            GgufValue::Array(
                items
                    .iter()
                    .map(|s| GgufValue::String(s.to_string()))
                    .collect(),
            )
        };
        let tokens = [
            "<|end|>", "<think>", "h", "i", "Ġ", "hi", "Ġhi", "â", "Ĥ", "¬", "âĤ", "€",
        ];
        let types = [3, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
            .map(GgufValue::I32)
            .to_vec();
        let mut metadata: std::collections::HashMap<String, GgufValue> = [
            (key::MODEL, GgufValue::String("gpt2".into())),
            (key::TOKENS, strings(&tokens)),
            (key::MERGES, strings(&["h i", "Ġ hi", "â Ĥ", "âĤ ¬"])),
            (key::TOKEN_TYPE, GgufValue::Array(types)),
            (key::EOS, GgufValue::U32(0)),
            (
                key::CHAT_TEMPLATE,
                GgufValue::String("{{ eos_token }}".into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            metadata.insert(k.to_string(), v.clone());
        }
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn gguf_control_and_user_defined_tokens_stay_whole() {
        let tok = TextTokenizer::from_gguf(&toy_gguf(&[]), Path::new("toy.gguf")).unwrap();
        assert_eq!(tok.vocab_size(), 12);
        assert_eq!(
            tok.encode("hi hi<|end|><think>€").unwrap(),
            [5, 6, 0, 1, 11]
        );
        assert_eq!(
            tok.decode(&[5, 6, 0, 1, 11]).unwrap(),
            "hi hi<|end|><think>€"
        );
        assert_eq!((tok.eos_token_id(), tok.eos_token()), (0, "<|end|>"));
        assert_eq!((tok.bos_token_id(), tok.add_bos_token()), (None, false));
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "<|end|>");
    }

    #[test]
    fn gguf_add_bos_token_prepends_it() {
        let extra = [
            (key::BOS, GgufValue::U32(1)),
            (key::ADD_BOS, GgufValue::Bool(true)),
        ];
        let tok = TextTokenizer::from_gguf(&toy_gguf(&extra), Path::new("toy.gguf")).unwrap();
        assert!(tok.add_bos_token());
        assert_eq!(tok.encode("hi").unwrap(), [1, 5]);
        assert_eq!(tok.encode_raw("hi").unwrap(), [5]);
        assert_eq!(tok.inner().encode("hi", true).unwrap().get_ids(), [1, 5]);
    }

    #[test]
    fn gguf_errors_name_the_key() {
        let path = Path::new("toy.gguf");
        let load = |extra: &[(&str, GgufValue)]| TextTokenizer::from_gguf(&toy_gguf(extra), path);
        let err = load(&[(key::MODEL, GgufValue::String("llama".into()))]).unwrap_err();
        assert!(matches!(&err, ModelError::UnsupportedTokenizer { found, .. } if found == "llama"));
        assert!(
            err.to_string()
                .starts_with("toy.gguf: `tokenizer.ggml.model` is `llama`"),
            "{err}"
        );
        let err = load(&[(key::EOS, GgufValue::U32(12))]).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidField { field, .. } if field == key::EOS),
            "{err}"
        );
        let err = load(&[(key::BOS, GgufValue::String("1".into()))]).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidField { field, .. } if field == key::BOS),
            "{err}"
        );
        let merges = GgufValue::Array(vec![GgufValue::String("h i x".into())]);
        let err = load(&[(key::MERGES, merges)]).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidField { field, .. } if field == key::MERGES),
            "{err}"
        );
        let merges = GgufValue::Array(vec![GgufValue::String("h x".into())]);
        let err = load(&[(key::MERGES, merges)]).unwrap_err();
        assert!(matches!(err, ModelError::Tokenizer { .. }), "{err}");
        let mut content = toy_gguf(&[]);
        content.metadata.remove(key::TOKENS);
        let err = TextTokenizer::from_gguf(&content, path).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingMetadata { key, .. } if key == key::TOKENS),
            "{err}"
        );
    }

    #[test]
    fn post_processor_template_matches_transformers() {
        let bos = SpecialToken {
            id: 1,
            text: "<s>".into(),
        };
        let eos = SpecialToken {
            id: 2,
            text: "</s>".into(),
        };
        for (b, e) in [(None, None), (Some(&bos), None), (Some(&bos), Some(&eos))] {
            assert!(special_tokens_template(b, e).is_ok());
        }
    }
}
