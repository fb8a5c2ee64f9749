//! The HTTP side: axum handlers that parse, tokenize, hand the request to the engine and turn
//! its events into OpenAI responses (JSON, or server-sent events for `stream: true`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lora::models::generate::GenerateOptions;
use lora::models::{Message, TextTokenizer};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::api::{self, ApiError, CompletionRequest, Prompt};
use super::engine::{Command, Event, Generate};

/// What every handler shares.
pub struct AppState {
    /// The engine's inbox.
    pub engine: Sender<Command>,
    /// The tokenizer (prompts are tokenized here, off the engine thread).
    pub tokenizer: Arc<TextTokenizer>,
    /// The base's served name.
    pub base_name: String,
    /// The context length.
    pub context: usize,
    /// Request ids.
    pub counter: AtomicU64,
}

type Shared = Arc<AppState>;

/// The router; the adapter routes only with `runtime_lora`.
pub fn router(state: Shared, runtime_lora: bool) -> Router {
    let mut router = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions));
    if runtime_lora {
        router = router
            .route("/v1/load_lora_adapter", post(load_adapter))
            .route("/v1/unload_lora_adapter", post(unload_adapter));
    }
    router.fallback(not_found).with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

fn engine_gone() -> ApiError {
    ApiError::server("the engine stopped")
}

async fn not_found(uri: Uri) -> Response {
    eprintln!("{uri} 404 no such route");
    error_response(&ApiError::not_found(format!("no route {uri}")))
}

async fn models(State(state): State<Shared>) -> Response {
    let (tx, rx) = oneshot::channel();
    if state.engine.send(Command::ListAdapters(tx)).is_err() {
        return error_response(&engine_gone());
    }
    let Ok(adapters) = rx.await else {
        return error_response(&engine_gone());
    };
    let created = now();
    let entry = |id: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": created, "owned_by": "lora",
               "root": parent.unwrap_or(id), "parent": parent,
               "max_model_len": state.context})
    };
    let mut data = vec![entry(&state.base_name, None)];
    data.extend(adapters.iter().map(|a| entry(a, Some(&state.base_name))));
    eprintln!("GET /v1/models 200");
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn load_adapter(State(state): State<Shared>, body: Bytes) -> Response {
    const ROUTE: &str = "POST /v1/load_lora_adapter";
    let (name, path) = match api::parse_load(&body) {
        Ok(v) => v,
        Err(e) => return logged(ROUTE, &e),
    };
    let (tx, rx) = oneshot::channel();
    let cmd = Command::Load {
        name: name.clone(),
        path,
        reply: tx,
    };
    adapter_command(&state, ROUTE, cmd, rx, (&name, "added")).await
}

async fn unload_adapter(State(state): State<Shared>, body: Bytes) -> Response {
    const ROUTE: &str = "POST /v1/unload_lora_adapter";
    let name = match api::parse_unload(&body) {
        Ok(v) => v,
        Err(e) => return logged(ROUTE, &e),
    };
    let (tx, rx) = oneshot::channel();
    let cmd = Command::Unload {
        name: name.clone(),
        reply: tx,
    };
    adapter_command(&state, ROUTE, cmd, rx, (&name, "removed")).await
}

/// Hands an adapter command to the engine and answers with its outcome, as vLLM words it
/// (`Success: LoRA adapter 'NAME' added successfully.`).
async fn adapter_command(
    state: &Shared,
    route: &str,
    cmd: Command,
    reply: oneshot::Receiver<Result<(), ApiError>>,
    (name, done): (&str, &str),
) -> Response {
    if state.engine.send(cmd).is_err() {
        return error_response(&engine_gone());
    }
    match reply.await {
        Ok(Ok(())) => {
            eprintln!("{route} 200 {name}");
            format!("Success: LoRA adapter '{name}' {done} successfully.").into_response()
        }
        Ok(Err(e)) => logged(route, &e),
        Err(_) => error_response(&engine_gone()),
    }
}

fn logged(what: &str, e: &ApiError) -> Response {
    eprintln!("{what} {} {}", e.status, e.message);
    error_response(e)
}

async fn completions(State(state): State<Shared>, body: Bytes) -> Response {
    match api::parse_completion(&body) {
        Ok(r) => complete(state, r, false).await,
        Err(e) => logged("POST /v1/completions", &e),
    }
}

async fn chat_completions(State(state): State<Shared>, body: Bytes) -> Response {
    match api::parse_chat(&body) {
        Ok(r) => complete(state, r, true).await,
        Err(e) => logged("POST /v1/chat/completions", &e),
    }
}

/// The prompt's ids and the number of tokens to generate.
fn tokenize(state: &AppState, r: &CompletionRequest) -> Result<(Vec<u32>, usize), ApiError> {
    let ids = match &r.prompt {
        Prompt::Text(text) => state
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::bad_field("prompt", format!("cannot tokenize: {e}")))?,
        Prompt::Chat(messages) => {
            let messages: Vec<Message> = messages
                .iter()
                .map(|(role, content)| Message::new(role.clone(), content.clone()))
                .collect();
            let text = state
                .tokenizer
                .apply_chat_template(&messages, true)
                .map_err(|e| ApiError::bad_field("messages", format!("chat template: {e}")))?;
            state
                .tokenizer
                .encode_raw(&text)
                .map_err(|e| ApiError::bad_field("messages", format!("cannot tokenize: {e}")))?
        }
    };
    let param = match r.prompt {
        Prompt::Text(_) => "prompt",
        Prompt::Chat(_) => "messages",
    };
    if ids.is_empty() {
        return Err(ApiError::bad_field(param, "the prompt has no tokens"));
    }
    let context = state.context;
    if ids.len() >= context {
        return Err(ApiError::bad_field(
            param,
            format!(
                "this model's maximum context length is {context} tokens, the prompt has {}",
                ids.len()
            ),
        ));
    }
    let room = context - ids.len();
    let max_tokens = match r.sampling.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad_field(
                "max_tokens",
                format!(
                    "this model's maximum context length is {context} tokens, but {} were requested ({} in the prompt, {n} in the completion)",
                    ids.len().saturating_add(n),
                    ids.len()
                ),
            ))
        }
        Some(n) => n,
        None => room,
    };
    Ok((ids, max_tokens))
}

/// Runs a completion: the engine's events as one JSON body or as server-sent events.
async fn complete(state: Shared, r: CompletionRequest, chat: bool) -> Response {
    let what = if chat {
        "POST /v1/chat/completions"
    } else {
        "POST /v1/completions"
    };
    let (prompt, max_tokens) = match tokenize(&state, &r) {
        Ok(v) => v,
        Err(e) => return logged(what, &e),
    };
    let adapter = (r.model != state.base_name).then(|| r.model.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let request = Generate {
        adapter,
        model: r.model.clone(),
        prompt,
        max_tokens,
        options: GenerateOptions {
            max_new_tokens: max_tokens,
            temperature: r.sampling.temperature,
            top_p: r.sampling.top_p,
            seed: r.sampling.seed,
            stop_tokens: Vec::new(),
        },
        stop: r.sampling.stop.clone(),
        events: tx,
    };
    if state.engine.send(Command::Generate(request)).is_err() {
        return error_response(&engine_gone());
    }
    // The first event says whether the request was taken.
    match rx.recv().await {
        Some(Event::Started) => {}
        Some(Event::Error(e)) => return error_response(&e),
        Some(_) | None => return error_response(&engine_gone()),
    }
    let n = state.counter.fetch_add(1, Ordering::Relaxed);
    let id = if chat {
        format!("chatcmpl-{n}")
    } else {
        format!("cmpl-{n}")
    };
    let shape = Shape {
        id,
        model: r.model.clone(),
        created: now(),
        chat,
    };
    if r.stream {
        return stream(shape, rx, r.include_usage);
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(piece)) => text.push_str(&piece),
            Some(Event::Started) => {}
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let usage = usage(prompt_tokens, completion_tokens);
                return Json(shape.whole(&text, finish_reason, usage)).into_response();
            }
            Some(Event::Error(e)) => return error_response(&e),
            None => return error_response(&engine_gone()),
        }
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
}

/// The fixed fields of a response's objects.
struct Shape {
    id: String,
    model: String,
    created: u64,
    chat: bool,
}

impl Shape {
    fn whole(&self, text: &str, finish_reason: &str, usage: Value) -> Value {
        if self.chat {
            json!({"id": self.id, "object": "chat.completion", "created": self.created,
                   "model": self.model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "logprobs": null, "finish_reason": finish_reason}],
                   "usage": usage})
        } else {
            json!({"id": self.id, "object": "text_completion", "created": self.created,
                   "model": self.model,
                   "choices": [{"index": 0, "text": text, "logprobs": null,
                                "finish_reason": finish_reason}],
                   "usage": usage})
        }
    }

    fn chunk(&self, piece: Option<&str>, role: bool, finish_reason: Option<&str>) -> Value {
        let choices = if self.chat {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(p) = piece {
                delta.insert("content".into(), json!(p));
            }
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}])
        } else {
            json!([{"index": 0, "text": piece.unwrap_or(""), "logprobs": null,
                    "finish_reason": finish_reason}])
        };
        json!({"id": self.id,
               "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
               "created": self.created, "model": self.model, "choices": choices})
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        json!({"id": self.id,
               "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
               "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}

fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

struct StreamState {
    shape: Shape,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    first: bool,
    done: bool,
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Dropping the body
/// (the client left) drops the receiver, which the engine notices at its next step.
fn stream(shape: Shape, rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let state = StreamState {
        shape,
        rx,
        include_usage,
        first: true,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = String::new();
        if s.first && s.shape.chat {
            out.push_str(&sse(&s.shape.chunk(Some(""), true, None)));
        }
        s.first = false;
        match s.rx.recv().await {
            Some(Event::Text(piece)) => {
                out.push_str(&sse(&s.shape.chunk(Some(&piece), false, None)))
            }
            Some(Event::Started) => {}
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let last = if s.shape.chat { None } else { Some("") };
                out.push_str(&sse(&s.shape.chunk(last, false, Some(finish_reason))));
                if s.include_usage {
                    out.push_str(&sse(&s
                        .shape
                        .usage_chunk(usage(prompt_tokens, completion_tokens))));
                }
                out.push_str("data: [DONE]\n\n");
                s.done = true;
            }
            Some(Event::Error(e)) => {
                out.push_str(&sse(&e.body()));
                out.push_str("data: [DONE]\n\n");
                s.done = true;
            }
            None => {
                out.push_str(&sse(&engine_gone().body()));
                s.done = true;
            }
        }
        Some((Ok::<_, Infallible>(out), s))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}
