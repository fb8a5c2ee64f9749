//! The OpenAI API's requests and errors: fields read one by one from the JSON so that a bad one
//! is named in the 400 it gets.

use serde_json::{json, Map, Value};

/// An error as the OpenAI API returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong and how to fix it.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for `param`.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }
    /// 400 with no field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
    /// 404: no such model or adapter.
    pub fn model_not_found(name: &str) -> Self {
        Self {
            status: 404,
            message: format!(
                "the model `{name}` does not exist: GET /v1/models lists the base and its adapters"
            ),
            kind: "not_found_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }
    /// 404 for a route that is not served.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
            kind: "not_found_error",
            param: None,
            code: None,
        }
    }
    /// 500: the model failed.
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Sampling settings and limits shared by both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// `max_tokens` (`None`: up to the context length).
    pub max_tokens: Option<usize>,
    /// `temperature` (default 1 as in OpenAI's API; 0 is greedy).
    pub temperature: f64,
    /// `top_p`.
    pub top_p: f64,
    /// `seed`.
    pub seed: u64,
    /// `stop` strings.
    pub stop: Vec<String>,
}

/// What a completion request asks for, before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/completions`: raw text.
    Text(String),
    /// `/v1/chat/completions`: `(role, content)` pairs.
    Chat(Vec<(String, String)>),
}

/// A parsed `/v1/completions` or `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// `model`: the base's served name or an adapter's name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling.
    pub sampling: Sampling,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_field(
            key,
            format!("`{key}` must be a string"),
        )),
    }
}

fn required_string(map: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    string(map, key)?.ok_or_else(|| ApiError::bad_field(key, format!("`{key}` is required")))
}

fn number(map: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad_field(key, format!("`{key}` must be a finite number"))),
        Some(_) => Err(ApiError::bad_field(
            key,
            format!("`{key}` must be a number"),
        )),
    }
}

fn unsigned(map: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_field(key, format!("`{key}` must be a non-negative integer"))
        }),
        Some(_) => Err(ApiError::bad_field(
            key,
            format!("`{key}` must be a non-negative integer"),
        )),
    }
}

fn boolean(map: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad_field(
            key,
            format!("`{key}` must be a boolean"),
        )),
    }
}

fn sampling(map: &Map<String, Value>) -> Result<Sampling, ApiError> {
    let max_tokens = match unsigned(map, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => unsigned(map, "max_tokens")?,
    };
    let max_tokens = max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    if max_tokens == Some(0) {
        return Err(ApiError::bad_field(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let temperature = number(map, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_field(
            "temperature",
            format!("`temperature` must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number(map, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_field(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let seed = match map.get("seed") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => return Err(ApiError::bad_field("seed", "`seed` must be an integer")),
        },
        Some(_) => return Err(ApiError::bad_field("seed", "`seed` must be an integer")),
    };
    let stop = match map.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::bad_field(
                    "stop",
                    "`stop` must be a string or an array of strings",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_field(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_field(
            "stop",
            "`stop` strings must not be empty",
        ));
    }
    if let Some(n) = unsigned(map, "n")? {
        if n != 1 {
            return Err(ApiError::bad_field("n", "only `n: 1` is supported"));
        }
    }
    Ok(Sampling {
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
    })
}

fn stream_options(map: &Map<String, Value>) -> Result<bool, ApiError> {
    match map.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(o)) => boolean(o, "include_usage").map_err(|_| {
            ApiError::bad_field(
                "stream_options.include_usage",
                "`stream_options.include_usage` must be a boolean",
            )
        }),
        Some(_) => Err(ApiError::bad_field(
            "stream_options",
            "`stream_options` must be an object",
        )),
    }
}

/// Parses a `/v1/completions` body.
///
/// # Errors
/// 400 naming the field at fault.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let map = object(body)?;
    let model = required_string(&map, "model")?;
    let prompt = match map.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
            Value::String(s) => s.clone(),
            _ => return Err(ApiError::bad_field("prompt", "`prompt` must be a string")),
        },
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_field(
                "prompt",
                "`prompt` must be one string (batches of prompts are not supported)",
            ))
        }
        None | Some(Value::Null) => {
            return Err(ApiError::bad_field("prompt", "`prompt` is required"))
        }
        Some(_) => return Err(ApiError::bad_field("prompt", "`prompt` must be a string")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_field("prompt", "`prompt` must not be empty"));
    }
    Ok(CompletionRequest {
        model,
        prompt: Prompt::Text(prompt),
        sampling: sampling(&map)?,
        stream: boolean(&map, "stream")?,
        include_usage: stream_options(&map)?,
    })
}

/// Parses a `/v1/chat/completions` body.
///
/// # Errors
/// 400 naming the field at fault.
pub fn parse_chat(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let map = object(body)?;
    let model = required_string(&map, "model")?;
    let Some(Value::Array(items)) = map.get("messages") else {
        return Err(ApiError::bad_field(
            "messages",
            "`messages` is required: an array of {\"role\", \"content\"}",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = |name: &str| format!("messages[{i}].{name}");
        let Value::Object(m) = item else {
            return Err(ApiError::bad_field(
                &format!("messages[{i}]"),
                format!("`messages[{i}]` must be an object with `role` and `content`"),
            ));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            _ => {
                return Err(ApiError::bad_field(
                    &field("role"),
                    format!("`{}` must be a string", field("role")),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type"), part.get("text")) {
                        (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => {
                            text.push_str(s)
                        }
                        _ => {
                            return Err(ApiError::bad_field(
                                &field("content"),
                                format!(
                                    "`{}` parts must be {{\"type\": \"text\", \"text\"}}",
                                    field("content")
                                ),
                            ))
                        }
                    }
                }
                text
            }
            None | Some(Value::Null) => String::new(),
            Some(_) => {
                return Err(ApiError::bad_field(
                    &field("content"),
                    format!("`{}` must be a string", field("content")),
                ))
            }
        };
        messages.push((role, content));
    }
    Ok(CompletionRequest {
        model,
        prompt: Prompt::Chat(messages),
        sampling: sampling(&map)?,
        stream: boolean(&map, "stream")?,
        include_usage: stream_options(&map)?,
    })
}

/// A `/v1/load_lora_adapter` body: `(lora_name, lora_path)`.
///
/// # Errors
/// 400 naming the field at fault.
pub fn parse_load(body: &[u8]) -> Result<(String, String), ApiError> {
    let map = object(body)?;
    let name = required_string(&map, "lora_name")?;
    let path = required_string(&map, "lora_path")?;
    if name.is_empty() {
        return Err(ApiError::bad_field(
            "lora_name",
            "`lora_name` must not be empty",
        ));
    }
    Ok((name, path))
}

/// A `/v1/unload_lora_adapter` body: `lora_name`.
///
/// # Errors
/// 400 naming the field at fault.
pub fn parse_unload(body: &[u8]) -> Result<String, ApiError> {
    let map = object(body)?;
    required_string(&map, "lora_name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_and_bad_ones_named() {
        let r = parse_completion(
            br#"{"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0, "stop": "x"}"#,
        )
        .unwrap();
        assert_eq!(r.sampling.max_tokens, Some(4));
        assert_eq!(r.sampling.stop, vec!["x".to_string()]);
        let e =
            parse_completion(br#"{"model": "m", "prompt": "hi", "max_tokens": "4"}"#).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("max_tokens")));
        let e = parse_completion(br#"{"model": "m""#).unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_chat(br#"{"model": "m", "messages": [{"role": 1}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse_chat(br#"{"model": "m", "messages": [], "top_p": 0}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }
}
