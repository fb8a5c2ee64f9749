//! `lora train` and the SFT loop behind it, on the tiny chat fixture (tiny-llama-tied's weights
//! with a small ChatML tokenizer, `tests/fixtures/llm/tiny-chat`, made by
//! `scripts/tiny_chat_fixture.py`): the loss falls, the loss mask covers exactly the assistant
//! turns and completions, a resumed run ends bit for bit where an uninterrupted one does (dropout
//! on), full fine-tuning writes a model that loads back, and bad data or targets are refused with
//! the file and line before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use lora::candle::{DType, Device, Tensor};
use lora::models::sft::{
    self, CausalLm, DataOptions, Dataset, Duration, Event, LossOn, SftConfig, Tuning,
};
use lora::models::Pretrained;
use lora::train::TrainerConfig;
use lora::{InitOptions, LoraConfig, LoraModelExt};

const LORA: &str = env!("CARGO_BIN_EXE_lora");

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/tiny-chat")
}

const DATA: &str = r#"{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
{"messages": [{"role": "user", "content": "Say no"}, {"role": "assistant", "content": "no way"}]}

{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count"}, {"role": "assistant", "content": "one two"}, {"role": "user", "content": "More"}, {"role": "assistant", "content": "three"}]}
{"prompt": "The sky is", "completion": " blue"}
{"text": "the end"}
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load() -> Pretrained {
    Pretrained::load(&model_dir(), DType::F32, &Device::Cpu).unwrap()
}

fn dataset(p: &Pretrained, path: &Path, options: &DataOptions) -> Dataset {
    Dataset::from_jsonl(path, &p.tokenizer, options).unwrap()
}

/// The text of each example's target tokens.
fn targets_text(p: &Pretrained, d: &Dataset) -> Vec<String> {
    d.examples
        .iter()
        .map(|e| {
            let ids: Vec<u32> = e
                .ids
                .iter()
                .zip(&e.targets)
                .filter(|(_, t)| **t)
                .map(|(i, _)| *i)
                .collect();
            p.tokenizer.decode(&ids).unwrap()
        })
        .collect()
}

#[test]
fn the_loss_covers_exactly_assistant_turns_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", DATA);
    let p = load();
    let d = dataset(&p, &path, &DataOptions::default());
    assert_eq!(d.examples.len(), 5);
    assert_eq!(
        d.examples.iter().map(|e| e.line).collect::<Vec<_>>(),
        [1, 2, 4, 5, 6]
    );
    assert_eq!(
        targets_text(&p, &d),
        [
            "hi there<|im_end|>",
            "no way<|im_end|>",
            "one two<|im_end|>three<|im_end|>",
            " blue<|im_end|>",
            // A text line trains on everything after its first token.
            "he end<|im_end|>",
        ]
    );
    // The ids are the rendered conversation's, as transformers tokenizes it.
    let first = &d.examples[0];
    let text = p.tokenizer.decode(&first.ids).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a tiny model.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
    );
    // --system replaces the template's default; --loss-on all covers every token but the first.
    let options = DataOptions {
        system: Some("S".into()),
        loss_on: LossOn::All,
        ..Default::default()
    };
    let d = dataset(&p, &path, &options);
    let text = p.tokenizer.decode(&d.examples[0].ids).unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nS<|im_end|>\n"),
        "{text}"
    );
    let e = &d.examples[0];
    assert!(!e.targets[0] && e.targets[1..].iter().all(|t| *t));
    // Truncation is counted.
    let short = DataOptions {
        max_seq_len: 12,
        ..Default::default()
    };
    let d = Dataset::from_jsonl(&path, &p.tokenizer, &short).unwrap();
    assert!(
        d.truncated >= 3 && d.skipped >= 2,
        "{} {}",
        d.truncated,
        d.skipped
    );
    assert!(d.examples.iter().all(|e| e.ids.len() <= 12));
}

#[test]
fn malformed_lines_are_refused_with_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = load();
    let good = r#"{"prompt": "a", "completion": "b"}"#;
    let cases = [
        (format!("{good}\n{{not json\n"), ":2: invalid JSON"),
        (
            format!("{good}\n\n{{\"prompt\": 3, \"completion\": \"x\"}}\n"),
            ":3: `prompt` must be a string, found a number",
        ),
        (
            format!("{good}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}\n"),
            ":2: the conversation has no assistant turn",
        ),
        (
            format!("{{\"messages\": [{{\"role\": \"user\", \"content\": 1}}]}}\n{good}\n"),
            ":1: `messages[0]`: `content` must be a string",
        ),
        (
            format!("{good}\n{{\"input\": \"x\"}}\n"),
            ":2: expected `messages`, `prompt` and `completion`, or `text`",
        ),
        ("\n\n".to_string(), ":1: the file holds no examples"),
        (String::new(), ":1: the file holds no examples"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("bad{i}.jsonl"), text);
        let err = Dataset::from_jsonl(&path, &p.tokenizer, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("bad{i}.jsonl{want}")),
            "case {i}: {err}"
        );
    }
}

fn lora_config() -> LoraConfig {
    LoraConfig::from_json(
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
    )
    .unwrap()
}

fn run_config(out: &Path, steps: u64) -> SftConfig {
    SftConfig {
        trainer: TrainerConfig {
            lr: 2e-2,
            warmup_steps: 2,
            ..Default::default()
        },
        duration: Duration::Steps(steps),
        batch_size: 2,
        grad_accum: 2,
        seed: 3,
        out: out.to_path_buf(),
        ..Default::default()
    }
}

/// A LoRA run of `steps` steps on DATA; `stop_at` sets the stop flag after that step.
fn lora_run(
    out: &Path,
    data: &Dataset,
    steps: u64,
    stop_at: Option<u64>,
    resume: Option<&Path>,
) -> (Pretrained, sft::Outcome) {
    lora_run_with(out, data, steps, stop_at, resume, false)
}

fn lora_run_with(
    out: &Path,
    data: &Dataset,
    steps: u64,
    stop_at: Option<u64>,
    resume: Option<&Path>,
    checkpointing: bool,
) -> (Pretrained, sft::Outcome) {
    adapter_run(
        lora_config(),
        out,
        data,
        steps,
        stop_at,
        resume,
        checkpointing,
    )
}

/// [`lora_run_with`] for an adapter of `adapter_config`.
fn adapter_run(
    adapter_config: LoraConfig,
    out: &Path,
    data: &Dataset,
    steps: u64,
    stop_at: Option<u64>,
    resume: Option<&Path>,
    checkpointing: bool,
) -> (Pretrained, sft::Outcome) {
    let mut p = load();
    p.model
        .init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &InitOptions::default()
                .with_peft_config(adapter_config)
                .with_seed(1),
        )
        .unwrap();
    let stop = AtomicBool::new(false);
    let mut config = run_config(out, steps);
    config.gradient_checkpointing = checkpointing;
    config.resume = resume.map(Path::to_path_buf);
    let tokenizer = p.tokenizer.clone();
    let outcome = sft::train(
        &mut p.model,
        &tokenizer,
        data,
        None,
        &config,
        &stop,
        &mut |e| {
            if let (Event::Step { stats, .. }, Some(at)) = (e, stop_at) {
                if stats.step == at {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        },
    )
    .unwrap();
    (p, outcome)
}

#[test]
fn training_lowers_the_loss_and_a_resumed_run_ends_bit_for_bit_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", DATA);
    let p = load();
    let data = dataset(&p, &path, &DataOptions::default());
    let before = sft::evaluate(&p.model, &data, 4, 2, &Device::Cpu).unwrap();

    let whole = dir.path().join("whole");
    let (trained, outcome) = lora_run(&whole, &data, 8, None, None);
    assert!(!outcome.stopped && outcome.steps == 8);
    let after = sft::evaluate(&trained.model, &data, 4, 2, &Device::Cpu).unwrap();
    assert!(after < before - 0.5, "loss {before} -> {after}");

    // Interrupted after step 3 (a checkpoint is written), then resumed to the end.
    let split = dir.path().join("split");
    let (_, outcome) = lora_run(&split, &data, 8, Some(3), None);
    assert!(outcome.stopped && outcome.steps == 3);
    let ckpt = split.join("checkpoint-3");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f}");
    }
    assert!(!split.join("adapter_model.safetensors").exists());
    let (_, outcome) = lora_run(&split, &data, 8, None, Some(&ckpt));
    assert_eq!(outcome.steps, 8);
    let (a, b) = (adapter_bits(&whole), adapter_bits(&split));
    assert_eq!(a.len(), 18); // 3 layers x 3 targets x (A, B)
    for (key, t) in &a {
        assert!(
            *t == b[key],
            "{key}: the resumed run differs from the uninterrupted one"
        );
    }

    // A checkpoint of other settings is refused before anything changes.
    let mut config = run_config(&split, 8);
    config.batch_size = 3;
    config.resume = Some(ckpt.clone());
    let err = refused_run(lora_config(), &data, &config);
    assert!(err.contains("batch size 2, this run has 3"), "{err}");
}

/// The error of a run of `config` with a fresh adapter of `adapter_config`.
fn refused_run(adapter_config: LoraConfig, data: &Dataset, config: &SftConfig) -> String {
    let mut p = load();
    p.model
        .init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &InitOptions::default().with_peft_config(adapter_config),
        )
        .unwrap();
    let tokenizer = p.tokenizer.clone();
    sft::train(
        &mut p.model,
        &tokenizer,
        data,
        None,
        config,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string()
}

/// The backward pass through the whole model (attention, RoPE, grouped heads, norms, MLP, the
/// frozen linear op, the fused LoRA op, the fused cross-entropy) against central finite
/// differences of the loss, for entries of `A` and `B` in the first and the last layer.
#[test]
fn lora_gradients_match_finite_differences() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", DATA);
    let mut p = load();
    let data = dataset(&p, &path, &DataOptions::default());
    p.model
        .init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &InitOptions::default()
                .with_peft_config(
                    LoraConfig::from_json(r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}"#)
                        .unwrap(),
                )
                .with_seed(4),
        )
        .unwrap();
    let vars = p.model.named_trainable_vars();
    for (_, v) in &vars {
        if v.dims()[1] == 2 {
            // B: non-zero, so A gets a gradient too.
            v.set(&Tensor::randn(0f32, 0.3, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let refs: Vec<&sft::Example> = data.examples.iter().collect();
    let batch = sft::Batch::new(&refs, 2, &Device::Cpu).unwrap();
    let loss = |m: &lora::models::llama::LlamaForCausalLM| -> f64 {
        f64::from(
            sft::loss_sum(m, &batch)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let grads = sft::loss_sum(&p.model, &batch).unwrap().backward().unwrap();
    let (mut checked, mut bad) = (0, 0);
    for (name, var) in &vars {
        if !(name.contains("layers.0.") || name.contains("layers.2.")) {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for &k in &[0usize, 7, 33] {
            let eps = 1e-2f32;
            let at = |d: f32| {
                let mut w = orig.clone();
                w[k] += d;
                var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&p.model)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let an = f64::from(g[k]);
            // eps = 1e-2 on a loss summed over ~100 tokens: truncation and f32 rounding of the
            // difference stay well under 2% (+ 0.02 absolute).
            eprintln!("{name}[{k}]: analytic {an:.5} finite-difference {fd:.5}");
            bad += usize::from((an - fd).abs() >= 2e-2 * (1.0 + fd.abs()));
            checked += 1;
        }
    }
    assert_eq!((checked, bad), (36, 0));
}

#[test]
fn gradient_checkpointing_trains_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", DATA);
    let p = load();
    let data = dataset(&p, &path, &DataOptions::default());
    let (plain, _) = lora_run_with(&dir.path().join("a"), &data, 4, None, None, false);
    let (ck, _) = lora_run_with(&dir.path().join("b"), &data, 4, None, None, true);
    assert!(
        ck.model.gradient_checkpointing().is_none(),
        "switched off at the end"
    );
    let (a, b) = (
        plain.model.named_trainable_vars(),
        ck.model.named_trainable_vars(),
    );
    assert_eq!(a.len(), 18);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        // Same dropout masks (the generator is rewound for the recomputation), same
        // arithmetic; only the order gradients are summed in may differ.
        let d = common::max_abs_diff(x.as_tensor(), y.as_tensor());
        assert!(d < 1e-5, "{name}: {d}");
    }
}

#[test]
fn full_fine_tuning_writes_a_model_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "d.jsonl", DATA);
    let mut p = load();
    let data = dataset(&p, &path, &DataOptions::default());
    let before = sft::evaluate(&p.model, &data, 4, 2, &Device::Cpu).unwrap();
    let out = dir.path().join("full");
    let mut config = run_config(&out, 6);
    config.tuning = Tuning::Full;
    config.trainer.lr = 2e-3;
    let tokenizer = p.tokenizer.clone();
    sft::train(
        &mut p.model,
        &tokenizer,
        &data,
        None,
        &config,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let after = sft::evaluate(&p.model, &data, 4, 2, &Device::Cpu).unwrap();
    assert!(after < before - 0.5, "loss {before} -> {after}");
    let back = Pretrained::load(&out, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 3]], &Device::Cpu).unwrap();
    let x = p.model.hidden_states(&ids).unwrap();
    let y = back.model.hidden_states(&ids).unwrap();
    let diff = common::max_abs_diff(&x, &y);
    // The same weights; the trained model's norms run the fused op with a backward (its weights
    // are variables), the loaded one's candle's kernel: rounding apart.
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(
        back.tokenizer.encode_raw("the end").unwrap(),
        tokenizer.encode_raw("the end").unwrap()
    );
    assert_eq!(back.tokenizer.chat_template(), tokenizer.chat_template());
}

/// The adapter file of `dir`, each tensor's bits.
fn adapter_bits(dir: &Path) -> std::collections::BTreeMap<String, Vec<u32>> {
    lora::candle::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let bits = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, bits.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// AdaLoRA in the SFT loop: the rank allocator runs after each step (the saved adapter is pruned
/// to the final rank pattern, which the config records), and a run interrupted after an
/// allocation and resumed from its checkpoint (the allocator's scores included) ends bit for bit
/// where the uninterrupted run does.
#[test]
fn adalora_runs_allocate_ranks_and_resume_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(
        &load(),
        &write(dir.path(), "d.jsonl", DATA),
        &DataOptions::default(),
    );
    let config = || {
        LoraConfig::from_json(
            r#"{"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                "deltaT": 1, "total_step": 7, "lora_alpha": 8, "lora_dropout": 0.1,
                "target_modules": ["q_proj", "v_proj"]}"#,
        )
        .unwrap()
    };
    let whole = dir.path().join("whole");
    let (trained, outcome) = adapter_run(config(), &whole, &data, 7, None, None, false);
    let pattern = outcome.rank_pattern.expect("a rank pattern");
    assert_eq!(pattern.len(), 6, "{pattern:?}"); // 3 layers x q_proj, v_proj
    let kept: usize = pattern.values().flatten().filter(|&&k| k).count();
    assert_eq!(kept, 2 * 6, "{pattern:?}");
    for (path, layer, _) in trained.model.lora_layers() {
        let Some(ad) = layer.adapter() else { continue };
        let kept = pattern[&format!("{path}.lora_E")]
            .iter()
            .filter(|&&k| k)
            .count();
        assert_eq!(ad.ranknum(), Some(4));
        // A module left with no singular value keeps its rank, E = 0 (see `RankAllocator::prune`).
        assert_eq!(ad.rank(), if kept == 0 { 4 } else { kept }, "{path}");
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["peft_type"], "ADALORA");
    assert_eq!(saved["total_step"], 7);
    let with_rank: std::collections::BTreeMap<_, _> =
        pattern.iter().filter(|(_, m)| m.contains(&true)).collect();
    assert_eq!(
        saved["rank_pattern"],
        serde_json::to_value(&with_rank).unwrap()
    );

    let split = dir.path().join("split");
    let (_, outcome) = adapter_run(config(), &split, &data, 7, Some(3), None, false);
    assert!(outcome.stopped && outcome.rank_pattern.is_some());
    let ckpt = split.join("checkpoint-3");
    assert!(ckpt.join("adalora_state.safetensors").is_file());
    let (_, outcome) = adapter_run(config(), &split, &data, 7, None, Some(&ckpt), false);
    assert_eq!(outcome.steps, 7);
    assert_eq!(outcome.rank_pattern, Some(pattern));
    assert!(
        adapter_bits(&whole) == adapter_bits(&split),
        "the resumed AdaLoRA run differs from the uninterrupted one"
    );

    // A schedule that does not fit the run is refused before training.
    let other = dir.path().join("other");
    let err = refused_run(config(), &data, &run_config(&other, 5));
    assert!(err.contains("plans 7 steps"), "{err}");
    assert!(!other.exists());
}

fn lora_train(args: &[&str]) -> Output {
    Command::new(LORA).arg("train").args(args).output().unwrap()
}

/// `lora train --model tiny-chat --data DIR/d.jsonl --out DIR/OUT FLAGS` with [`DATA`]: the
/// output directory and the process's output.
fn train_tiny_chat(dir: &Path, out: &str, flags: &[&str]) -> (PathBuf, Output) {
    let data = write(dir, "d.jsonl", DATA);
    let out = dir.join(out);
    let o = Command::new(LORA)
        .arg("train")
        .arg("--model")
        .arg(model_dir())
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(flags)
        .output()
        .unwrap();
    (out, o)
}

#[test]
fn the_command_trains_an_adapter_that_generate_loads_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "d.jsonl", DATA);
    let model = model_dir();
    let model = model.to_str().unwrap();
    let out = dir.path().join("adapter");
    let o = lora_train(&[
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--eval",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--targets",
        "all-linear",
        "--quiet",
        "--loraplus-ratio",
        "16",
        "--rslora",
        "--init",
        "gaussian",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("eval loss"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["use_rslora"], true);
    assert_eq!(config["base_model_name_or_path"], model);
    let targets = config["target_modules"].as_array().unwrap();
    assert_eq!(targets.len(), 7, "{targets:?}"); // every projection, not lm_head
    let g = Command::new(LORA)
        .args([
            "generate",
            "--model",
            model,
            "--adapter",
            out.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    // `lora merge` takes it onto the safetensors base (its recorded fingerprints match), and the
    // merged checkpoint's outputs equal the unmerged adapter's.
    let merged = dir.path().join("merged.safetensors");
    let base = model_dir().join("model.safetensors");
    let m = Command::new(LORA)
        .args([
            "merge",
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
        ])
        .args(["--out", merged.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let merged_dir = dir.path().join("merged-model");
    std::fs::create_dir_all(&merged_dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(model_dir().join(f), merged_dir.join(f)).unwrap();
    }
    std::fs::rename(&merged, merged_dir.join("model.safetensors")).unwrap();
    let mut unmerged = load();
    unmerged.model.load_adapter(&out).unwrap();
    let folded = Pretrained::load(&merged_dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 3]], &Device::Cpu).unwrap();
    let (a, b) = (
        unmerged
            .model
            .forward(&ids, &mut unmerged.model.new_cache())
            .unwrap(),
        folded
            .model
            .forward(&ids, &mut folded.model.new_cache())
            .unwrap(),
    );
    let diff = common::max_abs_diff(&a, &b);
    // f32 rounding of W + s B A against the unmerged sum, through 3 layers (logits up to ~10).
    assert!(diff < 1e-4, "merged vs unmerged logits: {diff}");

    // Nothing is written for bad data or targets that match nothing.
    let bad = write(
        dir.path(),
        "bad.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": 1}\n",
    );
    let none = dir.path().join("none");
    let o = lora_train(&[
        "--model",
        model,
        "--data",
        bad.to_str().unwrap(),
        "--out",
        none.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl:2: `text` must be a string"),
        "{err}"
    );
    let o = lora_train(&[
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--out",
        none.to_str().unwrap(),
        "--targets",
        "nothing_here",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("nothing_here"), "{err}");
    assert!(!none.exists());
}

/// `lora train --use-dora` trains a DoRA adapter (its magnitudes move away from the base
/// weight's row norms, where they start), saves it in PEFT's form, and `lora merge` folds it into
/// the safetensors base with PEFT's DoRA formula: the merged model's logits equal the unmerged
/// adapter's.
#[test]
fn the_command_trains_a_dora_adapter_that_lora_merge_folds_in() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir();
    let (out, o) = train_tiny_chat(
        dir.path(),
        "adapter",
        &[
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--targets",
            "q_proj,v_proj",
            "--use-dora",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    let saved =
        lora::candle::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let base =
        lora::candle::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let magnitudes: Vec<&String> = saved
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .collect();
    let factors = saved
        .keys()
        .filter(|k| k.ends_with(".lora_A.weight"))
        .count();
    assert_eq!(magnitudes.len(), factors, "{:?}", saved.keys());
    let moved = magnitudes.iter().any(|k| {
        let module = k
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_magnitude_vector"))
            .unwrap();
        let w = &base[&format!("{module}.weight")];
        let norms = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        common::max_abs_diff(&saved[*k], &norms) > 1e-4
    });
    assert!(moved, "training left every magnitude at its initial value");

    let merged_dir = dir.path().join("merged-model");
    std::fs::create_dir_all(&merged_dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(model.join(f), merged_dir.join(f)).unwrap();
    }
    let m = Command::new(LORA)
        .args(["merge", "--base"])
        .arg(model.join("model.safetensors"))
        .arg("--adapter")
        .arg(&out)
        .arg("--out")
        .arg(merged_dir.join("model.safetensors"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let mut unmerged = load();
    unmerged.model.load_adapter(&out).unwrap();
    let folded = Pretrained::load(&merged_dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 3]], &Device::Cpu).unwrap();
    let a = unmerged
        .model
        .forward(&ids, &mut unmerged.model.new_cache())
        .unwrap();
    let b = folded
        .model
        .forward(&ids, &mut folded.model.new_cache())
        .unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "merged vs unmerged logits: {diff}");
}

/// `--init pissa_niter_2`: OUT holds the trained adapter converted to plain LoRA for the original
/// base (rank doubled), which gives the logits of the residual base with the trained adapter.
#[test]
fn the_command_trains_a_pissa_adapter_converted_for_the_original_base() {
    let dir = tempfile::tempdir().unwrap();
    let (out, o) = train_tiny_chat(
        dir.path(),
        "adapter",
        &[
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--targets",
            "q_proj,v_proj",
            "--init",
            "pissa_niter_2",
            "--quiet",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let residual_dir = out.join("residual-adapter");
    assert_eq!(config(&out)["r"], 16);
    assert_eq!(config(&out)["init_lora_weights"], true);
    assert_eq!(config(&residual_dir)["init_lora_weights"], "pissa_niter_2");
    assert_eq!(config(&out.join("initial-adapter"))["r"], 8);

    let ids = Tensor::new(&[[1u32, 40, 41, 42, 3]], &Device::Cpu).unwrap();
    let mut plain = load();
    plain.model.load_adapter(&out).unwrap();
    let a = plain
        .model
        .forward(&ids, &mut plain.model.new_cache())
        .unwrap();
    // The run's own initialisation again (same config and seed), then the trained adapter.
    let mut residual = load();
    let peft = LoraConfig::from_json(
        r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "init_lora_weights": "pissa_niter_2"}"#,
    )
    .unwrap();
    residual
        .model
        .init_adapter_with(
            &lora::candle_nn::VarMap::new(),
            &lora::InitOptions::default()
                .with_peft_config(peft)
                .with_seed(0),
        )
        .unwrap();
    residual.model.load_adapter(&residual_dir).unwrap();
    let b = residual
        .model
        .forward(&ids, &mut residual.model.new_cache())
        .unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert!(
        diff < 1e-4,
        "converted on the original base vs residual: {diff}"
    );
    // And it changed the model: the converted adapter is not a no-op.
    let base = load();
    let c = base
        .model
        .forward(&ids, &mut base.model.new_cache())
        .unwrap();
    assert!(common::max_abs_diff(&a, &c) > 1e-4);
}

/// `lora train --adalora`: PEFT's AdaLoRA adapter with the final rank pattern, which `lora
/// generate --adapter` loads; the flags' misuses are refused before anything is written.
#[test]
fn the_command_trains_an_adalora_adapter_and_refuses_bad_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "d.jsonl", DATA);
    let model = model_dir();
    let model = model.to_str().unwrap();
    let out = dir.path().join("adapter");
    let common = [
        "--model",
        model,
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--quiet",
    ];
    let o = lora_train(
        &[
            &common[..],
            &[
                "--adalora",
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "6",
                "--init-r",
                "4",
                "--target-r",
                "2",
                "--tinit",
                "1",
                "--tfinal",
                "2",
                "--delta-t",
                "1",
                "--beta1",
                "0.8",
                "--beta2",
                "0.9",
                "--orth-reg-weight",
                "0.1",
            ],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("AdaLoRA ranks kept"), "{err}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(
        (&config["init_r"], &config["target_r"], &config["tinit"]),
        (
            &serde_json::json!(4),
            &serde_json::json!(2),
            &serde_json::json!(1)
        )
    );
    assert_eq!(
        (&config["tfinal"], &config["deltaT"], &config["total_step"]),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(6)
        )
    );
    assert_eq!(config["beta1"], 0.8);
    assert_eq!(config["beta2"], 0.9);
    assert_eq!(config["orth_reg_weight"], 0.1);
    let pattern = config["rank_pattern"].as_object().expect("a rank_pattern");
    // 3 layers x q_proj, v_proj; a module left with no singular value has no entry.
    assert!((1..=6).contains(&pattern.len()), "{pattern:?}");
    let kept = pattern
        .values()
        .flat_map(|m| m.as_array().unwrap())
        .filter(|b| b.as_bool() == Some(true))
        .count();
    assert_eq!(kept, 12, "{pattern:?}"); // target_r x modules
    let g = Command::new(LORA)
        .args(["generate", "--model", model, "--adapter"])
        .arg(&out)
        .args(["--prompt", "hi", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));

    let none = dir.path().join("none");
    let none = none.to_str().unwrap();
    for (args, expected) in [
        (
            &["--adalora", "--rank", "4", "--steps", "4"][..],
            "cannot be used with",
        ),
        (
            &["--adalora", "--steps", "4", "--tinit", "2", "--tfinal", "2"],
            "--tinit 2 must be below",
        ),
        (&["--adalora", "--steps", "0"], "at least one training step"),
        (&["--adalora", "--steps", "4", "--beta1", "1.0"], "beta1"),
        (&["--init-r", "4"], "--adalora"),
    ] {
        let o = lora_train(&[&common[..], &["--out", none], args].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(expected),
            "{args:?}: {err}"
        );
    }
    assert!(!Path::new(none).exists());
}
