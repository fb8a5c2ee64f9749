//! `lora serve` over HTTP on a loopback port with the tiny chat model
//! (`tests/fixtures/llm/tiny-chat`) and two adapters trained for it by `lora train`: the models
//! list, greedy completions equal to `lora generate --raw` while other adapters' requests run in
//! the same batch, streaming, errors, and adapters loaded and unloaded at run time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const LORA: &str = env!("CARGO_BIN_EXE_lora");

mod common;

use common::server::{dechunk, Server};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/tiny-chat")
}

const DATA: &str = r#"{"prompt": "The sky is", "completion": " blue and wide"}
{"prompt": "Once upon", "completion": " a time there was"}
{"text": "the end of the story"}
"#;

/// Two adapters for tiny-chat (`a`: every projection, `b`: q and v), trained once per run.
fn adapters() -> &'static (PathBuf, PathBuf) {
    static ADAPTERS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("d.jsonl");
        std::fs::write(&data, DATA).unwrap();
        let train = |name: &str, targets: &str, seed: &str| {
            let out = dir.join(name);
            let o = Command::new(LORA)
                .args(["train", "--model", model_dir().to_str().unwrap()])
                .args([
                    "--data",
                    data.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                ])
                .args(["--steps", "3", "--batch-size", "3", "--lr", "0.2"])
                .args(["--targets", targets, "--seed", seed, "--quiet"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out
        };
        (
            train("a", "all-linear", "1"),
            train("b", "q_proj,v_proj", "2"),
        )
    })
}

/// `lora generate --raw`'s completion (stdout without the final newline).
fn generate(adapter: Option<&Path>, prompt: &str, max_tokens: usize) -> String {
    let mut c = Command::new(LORA);
    c.args([
        "generate",
        "--model",
        model_dir().to_str().unwrap(),
        "--raw",
    ])
    .args([
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_tokens.to_string(),
    ]);
    if let Some(a) = adapter {
        c.args(["--adapter", a.to_str().unwrap()]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.pop(), Some('\n'));
    text
}

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn models_are_listed_and_greedy_completions_equal_generate_in_a_mixed_batch() {
    let (a, b) = adapters();
    let spec_a = format!("a={}", a.display());
    let spec_b = format!("b={}", b.display());
    let server = Server::start(&model_dir(), &["--adapter", &spec_a, "--adapter", &spec_b]);
    let (status, body) = server.request("GET", "/v1/models", "");
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-chat", "a", "b"]);

    // Three requests for three models at once, several times: they share decoding steps.
    let cases = [
        ("a", Some(a.as_path()), "The sky is", 60),
        ("b", Some(b.as_path()), "Once upon a time", 50),
        ("tiny-chat", None, "the end", 40),
    ];
    let server = Arc::new(server);
    for _round in 0..2 {
        let barrier = Arc::new(std::sync::Barrier::new(cases.len()));
        let handles: Vec<_> = cases
            .iter()
            .map(|&(model, _, prompt, n)| {
                let (server, barrier) = (Arc::clone(&server), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    server.post("/v1/completions", &completion(model, prompt, n))
                })
            })
            .collect();
        for (h, &(model, adapter, prompt, n)) in handles.into_iter().zip(&cases) {
            let (status, body) = h.join().unwrap();
            assert_eq!(status, 200, "{body}");
            let text = body["choices"][0]["text"].as_str().unwrap();
            assert_eq!(text, generate(adapter, prompt, n), "model {model}");
            assert_eq!(body["model"], model);
            let usage = &body["usage"];
            assert_eq!(
                usage["total_tokens"].as_u64().unwrap(),
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            );
        }
    }
    // The adapters change the output, and the requests did share steps.
    let (_, with_a) = server.post("/v1/completions", &completion("a", "The sky is", 20));
    let (_, base) = server.post(
        "/v1/completions",
        &completion("tiny-chat", "The sky is", 20),
    );
    assert_ne!(with_a["choices"][0]["text"], base["choices"][0]["text"]);
    let log = server.log();
    assert!(
        log.iter()
            .any(|l| l.contains("(batch of up to 2)") || l.contains("(batch of up to 3)")),
        "{log:#?}"
    );
}

#[test]
fn streamed_chunks_concatenate_to_the_whole_text() {
    let (a, _) = adapters();
    let spec = format!("a={}", a.display());
    let server = Server::start(&model_dir(), &["--adapter", &spec]);
    for chat in [false, true] {
        let (path, mut body) = if chat {
            (
                "/v1/chat/completions",
                json!({"model": "a", "messages": [{"role": "user", "content": "Say hi"}],
                       "max_tokens": 30, "temperature": 0}),
            )
        } else {
            ("/v1/completions", completion("a", "Once upon", 30))
        };
        let (status, whole) = server.post(path, &body);
        assert_eq!(status, 200, "{whole}");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let (status, text) = server.request("POST", path, &body.to_string());
        assert_eq!(status, 200, "{text}");
        let data = events(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let mut streamed = String::new();
        for c in &chunks {
            if let Some(choice) = c["choices"].get(0) {
                let piece = if chat {
                    &choice["delta"]["content"]
                } else {
                    &choice["text"]
                };
                streamed.push_str(piece.as_str().unwrap_or(""));
            }
        }
        let (want, object) = if chat {
            (
                &whole["choices"][0]["message"]["content"],
                "chat.completion.chunk",
            )
        } else {
            (&whole["choices"][0]["text"], "text_completion")
        };
        assert_eq!(streamed, want.as_str().unwrap());
        assert!(chunks.iter().all(|c| c["object"] == object));
        let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
        assert_eq!(finish, &whole["choices"][0]["finish_reason"]);
        assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);
    }
    // A stop string ends the text before it, streamed or not.
    let (_, whole) = server.post("/v1/completions", &completion("a", "Once upon", 30));
    let full = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let cut = full.char_indices().nth(6).map_or(full.len(), |(i, _)| i);
    let stop: String = full[cut..].chars().take(2).collect();
    if !stop.is_empty() {
        let mut body = completion("a", "Once upon", 30);
        body["stop"] = json!([stop]);
        let (_, stopped) = server.post("/v1/completions", &body);
        let text = stopped["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, &full[..full.find(&stop).unwrap()]);
        assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
        body["stream"] = json!(true);
        let (_, raw) = server.request("POST", "/v1/completions", &body.to_string());
        let streamed: String = events(&raw)
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .map(|c| c["choices"][0]["text"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(streamed, text);
    }
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&model_dir(), &[]);
    let check = |status: u16, body: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{body}");
        let e = &body["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(e["type"].is_string() && e.get("code").is_some(), "{body}");
        assert_eq!(e["param"].as_str(), param, "{body}");
    };
    let (s, b) = server.post("/v1/completions", &completion("nope", "hi", 4));
    check(s, &b, 404, Some("model"));
    let (s, b) = server.request("POST", "/v1/completions", "{\"model\": ");
    check(s, &serde_json::from_str(&b).unwrap(), 400, None);
    let (s, b) = server.post(
        "/v1/completions",
        &json!({"model": "tiny-chat", "prompt": "hi", "temperature": "hot"}),
    );
    check(s, &b, 400, Some("temperature"));
    let (s, b) = server.post("/v1/completions", &json!({"model": "tiny-chat"}));
    check(s, &b, 400, Some("prompt"));
    let (s, b) = server.post(
        "/v1/chat/completions",
        &json!({"model": "tiny-chat", "messages": [{"role": "user", "content": 3}]}),
    );
    check(s, &b, 400, Some("messages[0].content"));
    // Over the context (256 positions).
    let long = "word ".repeat(400);
    let (s, b) = server.post("/v1/completions", &completion("tiny-chat", &long, 4));
    check(s, &b, 400, Some("prompt"));
    let (s, b) = server.post("/v1/completions", &completion("tiny-chat", "hi", 1000));
    check(s, &b, 400, Some("max_tokens"));
    // The adapter routes are off without --allow-runtime-lora.
    let (s, b) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": "/nowhere"}),
    );
    check(s, &b, 404, None);
    let (s, b) = server.post("/v1/completions", &completion("tiny-chat", "hi", 3));
    assert_eq!(
        (s, b["usage"]["completion_tokens"].as_u64()),
        (200, Some(3)),
        "{b}"
    );
    // One log line per request.
    let log = server.log();
    assert!(
        log.iter().filter(|l| l.contains("400")).count() >= 6,
        "{log:#?}"
    );
}

#[test]
fn adapters_load_and_unload_at_run_time_within_max_loras() {
    let (a, b) = adapters();
    let server = Server::start(&model_dir(), &["--allow-runtime-lora", "--max-loras", "1"]);
    let load = |name: &str, path: &Path| {
        server.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path.to_str().unwrap()}),
        )
    };
    let (s, b1) = load("a", a);
    assert_eq!(s, 200, "{b1}");
    let (s, out) = server.post("/v1/completions", &completion("a", "The sky is", 12));
    assert_eq!(s, 200, "{out}");
    assert_eq!(
        out["choices"][0]["text"].as_str().unwrap(),
        generate(Some(a), "The sky is", 12)
    );
    // One more than --max-loras is refused, nothing evicted.
    let (s, e) = load("b", b);
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-loras"),
        "{e}"
    );
    let (s, e) = load("a", b);
    assert_eq!(s, 400, "{e}");
    let (s, _) = server.post("/v1/completions", &completion("a", "The sky is", 2));
    assert_eq!(s, 200);
    // Unload, then an adapter that fails validation (made for another model) is refused.
    let (s, e) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(s, 200, "{e}");
    let (s, e) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(s, 404, "{e}");
    let (s, e) = server.post("/v1/completions", &completion("a", "hi", 2));
    assert_eq!(s, 404, "{e}");
    let bad =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        a.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        bad.join("adapter_model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let (s, e) = load("c", &bad);
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("lora_path")),
        "{e}"
    );
    let (s, e) = load("c", Path::new("/no/such/adapter"));
    assert_eq!(s, 400, "{e}");
    let (s, e) = load("b", b);
    assert_eq!(s, 200, "{e}");
    let (s, list) = server.post("/v1/models", &json!({}));
    assert_eq!(s, 405, "{list}"); // GET only
    let (_, body) = server.request("GET", "/v1/models", "");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2, "{list}");
    let (s, out) = server.post("/v1/completions", &completion("b", "Once upon", 8));
    assert_eq!(s, 200, "{out}");
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_slot() {
    let server = Server::start(&model_dir(), &[]);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let body = json!({"model": "tiny-chat", "prompt": "Once upon", "max_tokens": 240,
                      "temperature": 1.0, "seed": 7, "stream": true})
    .to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    let start = Instant::now();
    loop {
        let log = server.log();
        if let Some(line) = log.iter().find(|l| l.starts_with("request ")) {
            // Either it ended by itself first (a stop token) or it noticed the client left.
            assert!(
                line.contains("client gone") || line.contains("200"),
                "{line}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{log:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, _) = server.post("/v1/completions", &completion("tiny-chat", "hi", 2));
    assert_eq!(s, 200);
}

#[test]
fn unloading_an_adapter_in_use_ends_its_requests_cleanly() {
    let (a, _) = adapters();
    let spec = format!("a={}", a.display());
    let server = Server::start(&model_dir(), &["--adapter", &spec, "--allow-runtime-lora"]);
    let body = json!({"model": "a", "prompt": "Once upon", "max_tokens": 240,
                      "temperature": 1.0, "seed": 3, "stream": true})
    .to_string();
    let mut s = TcpStream::connect(&server.addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Unload once the request runs (its first chunk came).
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    let (status, e) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(status, 200, "{e}");
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (_, rest) = raw.split_once("\r\n\r\n").unwrap();
    let data = events(&dechunk(rest));
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{raw}");
    // The stream ends with the error, or it finished before the unload.
    let ended: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(
        ended["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unloaded"))
            || ended["choices"][0]["finish_reason"].is_string(),
        "{ended}"
    );
    let (s, _) = server.post("/v1/completions", &completion("a", "hi", 2));
    assert_eq!(s, 404);
    let (s, _) = server.post("/v1/completions", &completion("tiny-chat", "hi", 2));
    assert_eq!(s, 200);
}

/// A DoRA adapter cannot join mixed-adapter batches: loading one is refused with a 400 naming
/// `lora_path` and DoRA, and the server keeps serving without it.
#[test]
fn a_dora_adapter_is_refused_by_name_and_the_server_keeps_serving() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-dora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("d.jsonl");
    std::fs::write(&data, DATA).unwrap();
    let dora = dir.join("dora");
    let o = Command::new(LORA)
        .args(["train", "--model", model_dir().to_str().unwrap()])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            dora.to_str().unwrap(),
        ])
        .args(["--steps", "1", "--batch-size", "3", "--use-dora", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(&model_dir(), &["--allow-runtime-lora"]);
    let (s, e) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "d", "lora_path": dora.to_str().unwrap()}),
    );
    assert_eq!(
        (s, e["error"]["param"].as_str()),
        (400, Some("lora_path")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("DoRA"),
        "{e}"
    );
    let (_, body) = server.request("GET", "/v1/models", "");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    let (s, e) = server.post("/v1/completions", &completion("d", "hi", 2));
    assert_eq!(s, 404, "{e}");
    let base = list["data"][0]["id"].as_str().unwrap().to_string();
    let (s, out) = server.post("/v1/completions", &completion(&base, "The sky is", 4));
    assert_eq!(s, 200, "{out}");
}
