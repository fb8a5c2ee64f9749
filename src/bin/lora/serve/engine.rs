//! The engine: one thread owns the model and runs the continuous batch. Requests arrive over a
//! channel, each with its own sender for the text it produces; between decoding steps new ones
//! join (their prompts prefilled one by one) and finished or abandoned ones leave. Every step
//! is one forward for all running sequences, whatever adapter each uses
//! (`set_batch_adapters` + [`LlamaForCausalLM::decode_step`]).

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use lora::candle::DType;
use lora::models::generate::{GenerateOptions, Sampler};
use lora::models::llama::{LlamaForCausalLM, SeqCache};
use lora::models::{TextTokenizer, TokenStream};
use lora::{LoadOptions, LoraModelExt};
use tokio::sync::{mpsc, oneshot};

use super::api::ApiError;

/// What a generation sends back.
#[derive(Debug)]
pub enum Event {
    /// The request was accepted (its prompt prefilled).
    Started,
    /// A piece of text.
    Text(String),
    /// The end.
    Done {
        /// `stop` or `length`.
        finish_reason: &'static str,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
    },
    /// It failed (before `Started`: the request is refused with this error).
    Error(ApiError),
}

/// A generation request, tokenized.
#[derive(Debug)]
pub struct Generate {
    /// The adapter (`None`: the base).
    pub adapter: Option<String>,
    /// The name the client used (for the log).
    pub model: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top-p, seed.
    pub options: GenerateOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Where the events go; dropped receiver = the client left.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A command for the engine thread.
#[derive(Debug)]
pub enum Command {
    /// Generate.
    Generate(Generate),
    /// The adapters' names.
    ListAdapters(oneshot::Sender<Vec<String>>),
    /// Load an adapter from a directory.
    Load {
        /// Its name.
        name: String,
        /// Its directory.
        path: String,
        /// The answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Unload an adapter; its running requests fail.
    Unload {
        /// Its name.
        name: String,
        /// The answer.
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// Limits of the engine.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The most sequences decoded together.
    pub max_batch: usize,
    /// The most adapters held.
    pub max_loras: usize,
    /// The base's served name (an adapter may not take it).
    pub base_name: String,
}

/// A running sequence.
struct Seq<'t> {
    id: u64,
    request: Generate,
    cache: SeqCache,
    sampler: Sampler,
    stream: TokenStream<'t>,
    /// The token to feed next.
    next: u32,
    generated: usize,
    /// The text decoded so far and how much of it was sent.
    text: String,
    sent: usize,
    start: Instant,
    /// The most sequences it was decoded with in one step (for the log).
    peak_batch: usize,
}

/// How a sequence ended.
enum End {
    /// A stop token or the length limit: the text held back is flushed.
    Finished(&'static str),
    /// A stop string: the text ends before it.
    StopString,
    Failed(ApiError),
    Gone,
}

/// Runs the engine until every sender of `commands` is dropped.
pub fn run(
    mut model: LlamaForCausalLM,
    tokenizer: &TextTokenizer,
    stop_tokens: &[u32],
    limits: &Limits,
    commands: Receiver<Command>,
) {
    let mut waiting: VecDeque<(u64, Generate)> = VecDeque::new();
    let mut active: Vec<Seq<'_>> = Vec::new();
    let mut next_id = 0u64;
    loop {
        // Intake: block only when there is nothing to do, then take whatever else is queued.
        let mut next = if active.is_empty() && waiting.is_empty() {
            match commands.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return,
            }
        } else {
            None
        };
        loop {
            let cmd = match next.take() {
                Some(cmd) => cmd,
                None => match commands.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if active.is_empty() && waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                },
            };
            handle(
                cmd,
                &mut model,
                limits,
                &mut waiting,
                &mut active,
                &mut next_id,
            );
        }
        // Leave: clients gone.
        let mut i = 0;
        while i < active.len() {
            if active[i].request.events.is_closed() {
                let seq = active.swap_remove(i);
                finish(seq, End::Gone);
            } else {
                i += 1;
            }
        }
        // Join: prefill new requests up to the batch size.
        while active.len() < limits.max_batch.max(1) {
            let Some((id, request)) = waiting.pop_front() else {
                break;
            };
            if request.events.is_closed() {
                log(id, &request, 0, "client gone", Instant::now());
                continue;
            }
            if let Some(seq) = admit(&mut model, tokenizer, stop_tokens, id, request) {
                active.push(seq);
            }
        }
        if active.is_empty() {
            continue;
        }
        // One decoding step for every running sequence.
        if let Err(e) = step(&mut model, stop_tokens, &mut active) {
            for seq in active.drain(..) {
                finish(
                    seq,
                    End::Failed(ApiError::server(format!("decoding failed: {e}"))),
                );
            }
        }
    }
}

fn handle(
    cmd: Command,
    model: &mut LlamaForCausalLM,
    limits: &Limits,
    waiting: &mut VecDeque<(u64, Generate)>,
    active: &mut Vec<Seq<'_>>,
    next_id: &mut u64,
) {
    match cmd {
        Command::Generate(request) => {
            let id = *next_id;
            *next_id += 1;
            if let Some(name) = &request.adapter {
                if !model.adapters().contains(name) {
                    let e = ApiError::model_not_found(name);
                    log(
                        id,
                        &request,
                        0,
                        &format!("404 {}", e.message),
                        Instant::now(),
                    );
                    let _ = request.events.send(Event::Error(e));
                    return;
                }
            }
            waiting.push_back((id, request));
        }
        Command::ListAdapters(reply) => {
            let _ = reply.send(model.adapters());
        }
        Command::Load { name, path, reply } => {
            // The handler logs the outcome.
            let _ = reply.send(load(model, limits, &name, &path));
        }
        Command::Unload { name, reply } => {
            if !model.adapters().contains(&name) {
                let _ = reply.send(Err(ApiError::not_found(format!(
                    "no adapter named `{name}` is loaded"
                ))));
                return;
            }
            let gone = || {
                ApiError::not_found(format!(
                    "the adapter `{name}` was unloaded while the request ran"
                ))
            };
            waiting.retain(|(id, r)| {
                if r.adapter.as_deref() == Some(name.as_str()) {
                    log(*id, r, 0, "adapter unloaded", Instant::now());
                    let _ = r.events.send(Event::Error(gone()));
                    false
                } else {
                    true
                }
            });
            let mut i = 0;
            while i < active.len() {
                if active[i].request.adapter.as_deref() == Some(name.as_str()) {
                    let seq = active.swap_remove(i);
                    finish(seq, End::Failed(gone()));
                } else {
                    i += 1;
                }
            }
            let result = model
                .set_batch_adapters(None)
                .and_then(|()| model.delete_adapter(&name))
                .map_err(|e| ApiError::server(format!("unloading `{name}`: {e}")));
            let _ = reply.send(result);
        }
    }
}

/// Loads an adapter under `name`, within the limits.
pub fn load(
    model: &mut LlamaForCausalLM,
    limits: &Limits,
    name: &str,
    path: &str,
) -> Result<(), ApiError> {
    let held = model.adapters();
    if name == limits.base_name {
        return Err(ApiError::bad_field(
            "lora_name",
            format!("`{name}` is the base model's name: choose another adapter name"),
        ));
    }
    if held.iter().any(|n| n == name) {
        return Err(ApiError::bad_field(
            "lora_name",
            format!("an adapter named `{name}` is already loaded: unload it first"),
        ));
    }
    if held.len() >= limits.max_loras {
        return Err(ApiError::bad_request(format!(
            "{} adapters are loaded, the most --max-loras allows: unload one first ({})",
            held.len(),
            held.join(", ")
        )));
    }
    model
        .set_batch_adapters(None)
        .map_err(|e| ApiError::server(e.to_string()))?;
    model
        .load_adapter_with(path, &LoadOptions::default().with_name(name))
        .map_err(|e| ApiError::bad_field("lora_path", format!("cannot load `{path}`: {e}")))?;
    // Sequences of different adapters share each decoding step, and a DoRA adapter rescales
    // its rows' base output, which mixed-adapter batches do not do: refused here, by name,
    // rather than failing every request for it.
    // AdaLoRA adapters are not routed either.
    let kind = model.lora_layers().iter().find_map(|(_, l, _)| {
        let ad = l.adapter_named(name)?;
        if ad.is_dora() {
            Some("a DoRA adapter (`use_dora`)")
        } else if ad.is_adalora() {
            Some("an AdaLoRA adapter (`peft_type: ADALORA`)")
        } else {
            None
        }
    });
    if let Some(kind) = kind {
        model
            .delete_adapter(name)
            .map_err(|e| ApiError::server(e.to_string()))?;
        return Err(ApiError::bad_field(
            "lora_path",
            format!(
                "cannot serve `{path}`: it is {kind}, and mixed-adapter batches support plain LoRA adapters only; fold it into the base with `lora merge` and serve the merged model"
            ),
        ));
    }
    // Requests choose their adapter per row; none is active by default.
    model
        .set_active_adapter(None)
        .map_err(|e| ApiError::server(e.to_string()))
}

/// Prefills a request's prompt and picks its first token.
fn admit<'t>(
    model: &mut LlamaForCausalLM,
    tokenizer: &'t TextTokenizer,
    stop_tokens: &[u32],
    id: u64,
    request: Generate,
) -> Option<Seq<'t>> {
    let start = Instant::now();
    let row = [request.adapter.as_deref()];
    let mut cache = model.new_cache();
    let logits = model
        .set_batch_adapters(Some(&row))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            model
                .prefill(&request.prompt, &mut cache)
                .and_then(|l| Ok(l.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
                .map_err(|e| e.to_string())
        });
    let logits = match logits {
        Ok(l) => l,
        Err(e) => {
            log(id, &request, 0, &format!("500 prefill failed: {e}"), start);
            let _ = request.events.send(Event::Error(ApiError::server(format!(
                "prefill failed: {e}"
            ))));
            return None;
        }
    };
    let _ = request.events.send(Event::Started);
    let mut seq = Seq {
        id,
        sampler: Sampler::new(&request.options),
        request,
        cache,
        stream: tokenizer.stream(),
        next: 0,
        generated: 0,
        text: String::new(),
        sent: 0,
        start,
        peak_batch: 1,
    };
    match accept(&mut seq, &logits, stop_tokens) {
        None => Some(seq),
        Some(end) => {
            finish(seq, end);
            None
        }
    }
}

/// One decoding step of every active sequence; the finished ones leave.
fn step(
    model: &mut LlamaForCausalLM,
    stop_tokens: &[u32],
    active: &mut Vec<Seq<'_>>,
) -> Result<(), String> {
    let rows: Vec<Option<&str>> = active
        .iter()
        .map(|s| s.request.adapter.as_deref())
        .collect();
    model
        .set_batch_adapters(Some(&rows))
        .map_err(|e| e.to_string())?;
    let tokens: Vec<u32> = active.iter().map(|s| s.next).collect();
    let b = active.len();
    for seq in active.iter_mut() {
        seq.peak_batch = seq.peak_batch.max(b);
    }
    let mut caches: Vec<&mut SeqCache> = active.iter_mut().map(|s| &mut s.cache).collect();
    let logits: Vec<Vec<f32>> = model
        .decode_step(&tokens, &mut caches)
        .and_then(|l| Ok(l.to_dtype(DType::F32)?.to_vec2::<f32>()?))
        .map_err(|e| e.to_string())?;
    let mut ends: Vec<Option<End>> = active
        .iter_mut()
        .zip(&logits)
        .map(|(seq, row)| accept(seq, row, stop_tokens))
        .collect();
    let mut i = active.len();
    while i > 0 {
        i -= 1;
        if let Some(end) = ends[i].take() {
            let seq = active.swap_remove(i);
            finish(seq, end);
        }
    }
    Ok(())
}

/// Takes the token picked from `logits`: `Some` when the sequence ends with it.
fn accept(seq: &mut Seq<'_>, logits: &[f32], stop_tokens: &[u32]) -> Option<End> {
    let token = seq.sampler.pick(logits);
    if stop_tokens.contains(&token) {
        return Some(End::Finished("stop"));
    }
    seq.generated += 1;
    seq.next = token;
    match seq.stream.push(token) {
        Ok(Some(piece)) => seq.text.push_str(&piece),
        Ok(None) => {}
        Err(e) => return Some(End::Failed(ApiError::server(format!("decoding: {e}")))),
    }
    if let Some(end) = send_text(seq, false) {
        return Some(end);
    }
    if seq.generated >= seq.request.max_tokens {
        return Some(End::Finished("length"));
    }
    None
}

/// Sends what can be sent of the text: up to a stop string (then the end), and otherwise all
/// but a tail that may begin one (all of it when `flush`).
fn send_text(seq: &mut Seq<'_>, flush: bool) -> Option<End> {
    let stops = &seq.request.stop;
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let mut from = seq.sent.saturating_sub(longest);
    while !seq.text.is_char_boundary(from) {
        from -= 1;
    }
    let hit = stops
        .iter()
        .filter_map(|s| seq.text[from..].find(s.as_str()).map(|p| from + p))
        .min();
    let (upto, end) = match hit {
        Some(p) => (p, Some(End::StopString)),
        None if flush => (seq.text.len(), None),
        None => {
            // Hold back the longest tail that is the start of a stop string.
            let text = &seq.text;
            let held = (1..longest.min(text.len()) + 1)
                .rev()
                .find(|&n| {
                    let k = text.len() - n;
                    text.is_char_boundary(k) && stops.iter().any(|s| s.starts_with(&text[k..]))
                })
                .unwrap_or(0);
            (text.len() - held, None)
        }
    };
    if upto > seq.sent {
        let piece = seq.text[seq.sent..upto].to_string();
        seq.sent = upto;
        if seq.request.events.send(Event::Text(piece)).is_err() {
            return Some(End::Gone);
        }
    }
    if end.is_some() {
        seq.text.truncate(upto);
    }
    end
}

fn finish(mut seq: Seq<'_>, end: End) {
    let end = match end {
        End::Finished(reason) => {
            if let Ok(Some(rest)) = seq.stream.clone().finish() {
                seq.text.push_str(&rest);
            }
            match send_text(&mut seq, true) {
                Some(End::StopString) => End::Finished("stop"),
                Some(other) => other,
                None => End::Finished(reason),
            }
        }
        End::StopString => End::Finished("stop"),
        other => other,
    };
    let (prompt_tokens, completion_tokens) = (seq.request.prompt.len(), seq.generated);
    let outcome = match end {
        End::Finished(reason) => {
            let _ = seq.request.events.send(Event::Done {
                finish_reason: reason,
                prompt_tokens,
                completion_tokens,
            });
            format!("200 {reason}")
        }
        End::Failed(e) => {
            let line = format!("{} {}", e.status, e.message);
            let _ = seq.request.events.send(Event::Error(e));
            line
        }
        End::Gone => "client gone".to_string(),
        End::StopString => "200 stop".to_string(), // made `Finished` above
    };
    let outcome = format!("{outcome} (batch of up to {})", seq.peak_batch);
    log(seq.id, &seq.request, completion_tokens, &outcome, seq.start);
}

fn log(id: u64, r: &Generate, completion_tokens: usize, outcome: &str, start: Instant) {
    eprintln!(
        "request {id} model={} prompt_tokens={} completion_tokens={completion_tokens} {:.3}s {outcome}",
        r.model,
        r.prompt.len(),
        start.elapsed().as_secs_f64()
    );
}
