//! `lora generate`: the completion alone on stdout (against transformers' greedy answer for
//! SmolLM2), adapters unmerged and merged, and named errors with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LORA: &str = env!("CARGO_BIN_EXE_lora");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm")
}

fn lora(args: &[&str]) -> Output {
    Command::new(LORA)
        .arg("generate")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn smollm2_answers_like_transformers_on_stdout_alone() {
    let Some(model) = lora::models::cache::smollm2_or_skip("lora generate").unwrap() else {
        return;
    };
    let model = model.to_str().unwrap();
    let prompt = "What is the capital of France?";
    // transformers' greedy answer (tests/fixtures/llm/smollm2.json), then one newline.
    let want = "The capital of France is Paris.\n";
    let plain = lora(&["--model", model, "--prompt", prompt]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert_eq!(stdout(&plain), want);
    assert!(stderr(&plain).contains("tokens/s"), "{}", stderr(&plain));
    let adapter = fixtures().join("smollm2-adapter");
    let adapter = adapter.to_str().unwrap();
    // The fixture adapter's greedy answer is the same sentence (PEFT's `adapter_greedy_text`).
    for extra in [&[][..], &["--merge"][..]] {
        let mut args = vec!["--model", model, "--prompt", prompt, "--adapter", adapter];
        args.extend_from_slice(extra);
        let out = lora(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), want, "{extra:?}");
    }
    // The prompt from stdin, a system prompt, and a token limit.
    let mut child = Command::new(LORA)
        .args(["generate", "--model", model, "--max-new-tokens", "3"])
        .args(["--system", "You are a pirate."])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say hello.")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("generated 3 tokens"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_tiny_gguf_generates_raw_text() {
    // 256 byte tokens and no chat template: --raw works, the chat template is a named error.
    let gguf = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
    let gguf = gguf.to_str().unwrap();
    let out = lora(&[
        "--model",
        gguf,
        "--raw",
        "--prompt",
        "abc",
        "--max-new-tokens",
        "5",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("generated"), "{}", stderr(&out));
    let out = lora(&["--model", gguf, "--prompt", "abc"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chat_template"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
}

#[test]
fn bad_inputs_are_named_errors_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = fixtures().join("tiny-llama-gguf/tiny-llama.gguf");
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let missing = dir.path().join("missing.gguf");
    let wrong_adapter = fixtures().join("smollm2-adapter");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--model", missing.to_str().unwrap(), "--prompt", "x"],
            vec!["missing.gguf"],
        ),
        (
            vec!["--model", cut.to_str().unwrap(), "--raw", "--prompt", "x"],
            vec!["cut.gguf", "tensor `"],
        ),
        (
            vec![
                "--model",
                gguf.to_str().unwrap(),
                "--adapter",
                wrong_adapter.to_str().unwrap(),
                "--raw",
                "--prompt",
                "x",
            ],
            vec!["adapter_model.safetensors", "does not fit layer"],
        ),
        (
            vec![
                "--model",
                gguf.to_str().unwrap(),
                "--dtype",
                "quantized",
                "--adapter",
                wrong_adapter.to_str().unwrap(),
                "--merge",
                "--prompt",
                "x",
            ],
            vec!["--merge needs dense weights"],
        ),
        (
            vec![
                "--model",
                gguf.to_str().unwrap(),
                "--merge",
                "--prompt",
                "x",
            ],
            vec!["--adapter"],
        ),
    ];
    for (args, needles) in cases {
        let out = lora(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }
}
