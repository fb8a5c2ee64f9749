//! Training data in the JSONL formats TRL's SFT trainer reads, tokenized with a loss mask.
//!
//! Each line is one of:
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation, rendered with the
//!   model's chat template; the loss covers the assistant turns (content and end-of-turn token);
//! - `{"prompt": str, "completion": str}`: raw text, no template; the loss covers the completion
//!   and the end-of-sequence token appended to it;
//! - `{"text": str}`: language modelling; the loss covers every token and the appended
//!   end-of-sequence token.
//!
//! The loss mask is found by *position*, never by token id (SmolLM2's pad, eos and end-of-turn
//! are all id 2): the conversation is rendered once whole and once up to each assistant turn, and
//! the tokens whose text starts inside an assistant turn's characters are the targets.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::Message;
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// Which tokens the loss covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossOn {
    /// Assistant turns and completions (every token of `text` lines).
    #[default]
    Completions,
    /// Every token, prompts and templates included (TRL's default for `messages`).
    All,
}

/// How lines become token sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOptions {
    /// A system prompt put in front of conversations that have none, replacing the template's
    /// default (SmolLM2's costs ~20 tokens an example).
    pub system: Option<String>,
    /// Which tokens the loss covers.
    pub loss_on: LossOn,
    /// Sequences are cut to this many tokens.
    pub max_seq_len: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            system: None,
            loss_on: LossOn::Completions,
            max_seq_len: 512,
        }
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The token ids.
    pub ids: Vec<u32>,
    /// Per position: whether `ids[i]` is a target of the loss (predicted from `ids[..i]`);
    /// position 0 never is.
    pub targets: Vec<bool>,
    /// The line of the file it came from (from 1).
    pub line: usize,
}

impl Example {
    /// The number of tokens the loss covers.
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().skip(1).filter(|t| **t).count()
    }
}

/// A tokenized data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Its examples, in file order.
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left out because truncation removed every loss token.
    pub skipped: usize,
}

impl Dataset {
    /// Reads and tokenizes a JSONL file. Every line is checked before anything is returned: the
    /// first malformed one is an error naming the file and the line.
    ///
    /// # Errors
    /// [`ModelError::Io`] for an unreadable file; [`ModelError::Data`] naming the line for bad
    /// JSON, an unknown format, a field of the wrong type, a conversation without an assistant
    /// turn, or a file without examples.
    pub fn from_jsonl(
        path: &Path,
        tokenizer: &TextTokenizer,
        options: &DataOptions,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let data_err = |line: usize, reason: String| ModelError::Data {
            path: path.to_path_buf(),
            line,
            reason,
        };
        if options.max_seq_len < 2 {
            return Err(data_err(
                0,
                format!(
                    "max sequence length {} leaves nothing to predict (at least 2)",
                    options.max_seq_len
                ),
            ));
        }
        let (mut examples, mut truncated, mut skipped) = (Vec::new(), 0, 0);
        let mut lines = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            lines += 1;
            let record: Value = serde_json::from_str(raw)
                .map_err(|e| data_err(line, format!("invalid JSON: {e}")))?;
            let mut example = encode_record(&record, tokenizer, options)
                .map_err(|reason| data_err(line, reason))?;
            example.line = line;
            if example.ids.len() > options.max_seq_len {
                example.ids.truncate(options.max_seq_len);
                example.targets.truncate(options.max_seq_len);
                truncated += 1;
            }
            if example.loss_tokens() == 0 {
                skipped += 1;
                continue;
            }
            examples.push(example);
        }
        if examples.is_empty() {
            let reason = if lines == 0 {
                "the file holds no examples".to_string()
            } else {
                format!(
                    "no example has a token to train on after truncation to {} tokens",
                    options.max_seq_len
                )
            };
            return Err(data_err(lines.max(1), reason));
        }
        Ok(Self {
            path: path.to_path_buf(),
            examples,
            truncated,
            skipped,
        })
    }

    /// The number of tokens the loss covers, over all examples.
    pub fn loss_tokens(&self) -> usize {
        self.examples.iter().map(Example::loss_tokens).sum()
    }

    /// The number of tokens, over all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }
}

/// A string field of `record`.
fn string_field<'a>(record: &'a Value, field: &str) -> std::result::Result<&'a str, String> {
    match record.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{field}` must be a string, found {}", kind(other))),
        None => Err(format!("missing `{field}`")),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Tokenizes one record (any of the three formats); the error says what is wrong with it.
///
/// # Errors
/// A description of the problem, without the file and line (the caller adds them).
pub fn encode_record(
    record: &Value,
    tokenizer: &TextTokenizer,
    options: &DataOptions,
) -> std::result::Result<Example, String> {
    let Value::Object(map) = record else {
        return Err(format!("expected a JSON object, found {}", kind(record)));
    };
    let all = options.loss_on == LossOn::All;
    let fail = |e: ModelError| e.to_string();
    let eos = tokenizer.eos_token_id();
    let (ids, targets) = if let Some(messages) = map.get("messages") {
        let messages = parse_messages(messages)?;
        encode_chat(&messages, tokenizer, options).map_err(|e| match e {
            ChatError::Model(e) => fail(e),
            ChatError::Data(s) => s,
        })?
    } else if map.contains_key("prompt") || map.contains_key("completion") {
        let prompt = tokenizer
            .encode(string_field(record, "prompt")?)
            .map_err(fail)?;
        let mut completion = tokenizer
            .encode_raw(string_field(record, "completion")?)
            .map_err(fail)?;
        completion.push(eos);
        let mut targets = vec![all; prompt.len()];
        targets.extend(std::iter::repeat_n(true, completion.len()));
        ([prompt, completion].concat(), targets)
    } else if map.contains_key("text") {
        let mut ids = tokenizer
            .encode(string_field(record, "text")?)
            .map_err(fail)?;
        ids.push(eos);
        let n = ids.len();
        (ids, vec![true; n])
    } else {
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        return Err(format!(
            "expected `messages`, `prompt` and `completion`, or `text`; found keys {keys:?}"
        ));
    };
    let mut targets = targets;
    if let Some(first) = targets.first_mut() {
        *first = false;
    }
    Ok(Example {
        ids,
        targets,
        line: 0,
    })
}

fn parse_messages(value: &Value) -> std::result::Result<Vec<Message>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "`messages` must be an array, found {}",
            kind(value)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !m.is_object() {
                return Err(format!(
                    "`messages[{i}]` must be an object, found {}",
                    kind(m)
                ));
            }
            let field =
                |name: &str| string_field(m, name).map_err(|e| format!("`messages[{i}]`: {e}"));
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

enum ChatError {
    Model(ModelError),
    Data(String),
}

impl From<ModelError> for ChatError {
    fn from(e: ModelError) -> Self {
        Self::Model(e)
    }
}

/// A conversation's ids and targets: rendered whole, and up to each assistant turn to find the
/// characters of that turn; tokens starting inside them are targets.
fn encode_chat(
    messages: &[Message],
    tokenizer: &TextTokenizer,
    options: &DataOptions,
) -> std::result::Result<(Vec<u32>, Vec<bool>), ChatError> {
    let mut messages = messages.to_vec();
    if let Some(system) = &options.system {
        if messages.first().is_none_or(|m| m.role != "system") {
            messages.insert(0, Message::new("system", system.clone()));
        }
    }
    let assistant: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    if assistant.is_empty() {
        return Err(ChatError::Data(
            "the conversation has no assistant turn: nothing to train on".into(),
        ));
    }
    let full = tokenizer.apply_chat_template(&messages, false)?;
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(assistant.len());
    for &i in &assistant {
        let before = tokenizer.apply_chat_template(&messages[..i], true)?;
        let through = tokenizer.apply_chat_template(&messages[..=i], false)?;
        if !(full.starts_with(&through) && through.starts_with(&before)) {
            return Err(ChatError::Data(format!(
                "the chat template does not render this conversation turn by turn (message {i} \
                 changes what comes before it), so its assistant turns cannot be located"
            )));
        }
        spans.push(before.len()..through.trim_end().len());
    }
    let encoding = tokenizer
        .inner()
        .encode(full.as_str(), false)
        .map_err(|source| ChatError::Model(ModelError::Encode { source }))?;
    let all = options.loss_on == LossOn::All;
    let targets = encoding
        .get_offsets()
        .iter()
        .map(|&(start, _)| all || spans.iter().any(|s| s.contains(&start)))
        .collect();
    Ok((encoding.get_ids().to_vec(), targets))
}
