#!/usr/bin/env python3
"""Training beside PyTorch + PEFT on SmolLM2-135M-Instruct, same data, same shapes, same run:
tokens/s and peak RSS of `lora train` (LoRA r=8 on q_proj, v_proj; and full fine-tuning) against
transformers + PEFT on the same GGUF (dequantized to f32), 2 threads each, one process per case
(so each peak RSS is its own, model loading included). Then our activation checkpointing:
batch 1 x 1024 tokens with and without `--gradient-checkpointing`.

    /tmp/llmvenv/bin/python scripts/bench_train.py [--model GGUF] [--steps 6] [--repeat 3]

Data: `text` lines long enough to be cut to exactly 129 tokens by both sides (`--max-seq-len 129`,
loss on every token), so every step is 8 x 128 input tokens. Throughput is over all steps after
loading (the first step included, on both sides). Needs the release binary
(`cargo build --release --bin lora`) and torch, transformers, peft, gguf.
"""

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_model():
    return str(Path(os.environ.get("LORA_MODELS_DIR", Path.home() / ".cache/lora/models")) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_data(path, n, seed=0):
    words = "the of and to in is was for on that with as by at from his her they this which one all were".split()
    extra = "river castle market garden engine winter silver orange planet music letter forest doctor island window".split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(words + extra) for _ in range(220))
            f.write(json.dumps({"text": text}) + "\n")


def ours(args, data, mode, batch, seq, steps, extra=()):
    binary = os.environ.get("LORA_BIN", str(ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release/lora"))
    out = tempfile.mkdtemp()
    cmd = [
        "/usr/bin/time", "-v", binary, "train", "--model", args.model, "--data", data, "--out", out,
        "--steps", str(steps), "--batch-size", str(batch), "--max-seq-len", str(seq + 1),
        "--loss-on", "all", "--lr", "1e-4", "--quiet", "--dtype", "f32", *extra,
    ]
    cmd += ["--full"] if mode == "full" else ["--targets", "q_proj,v_proj"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"lora train failed:\n{r.stderr}")
    tps = float(re.search(r"([0-9.]+) tokens/s", r.stderr).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    return tps, rss


def torch_case(args, data, mode, batch, seq, steps):
    r = subprocess.run(
        [sys.executable, __file__, "--torch-child", mode, "--model", args.model, "--data", data,
         "--steps", str(steps), "--batch", str(batch), "--seq", str(seq), "--threads", str(args.threads)],
        capture_output=True, text=True,
    )
    if r.returncode != 0:
        sys.exit(f"torch case failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["tokens_per_s"], res["peak_rss"]


def torch_child(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, name = os.path.dirname(args.model), os.path.basename(args.model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    if args.torch_child == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rows = []
    for line in open(args.data):
        ids = tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
        assert len(ids) >= args.seq + 1, len(ids)
        rows.append(ids[: args.seq + 1])
    start, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        batch = torch.tensor([rows[(step * args.batch + i) % len(rows)] for i in range(args.batch)])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        tokens += args.batch * args.seq
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"tokens_per_s": tokens / secs, "peak_rss": peak, "torch": torch.__version__}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=default_model())
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-child")
    p.add_argument("--data")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per case, ours and theirs alternating; the table shows medians")
    p.add_argument("--no-checkpointing", action="store_true", help="skip the batch 1 x 1024 cases")
    args = p.parse_args()
    if args.torch_child:
        return torch_child(args)
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "data.jsonl")
    make_data(data, 64)
    gib = 1 << 30
    runs = {}
    for mode in ["lora", "full"]:
        for _ in range(args.repeat):
            runs.setdefault(("ours", mode), []).append(ours(args, data, mode, 8, 128, args.steps))
            if not args.skip_torch:
                runs.setdefault(("torch", mode), []).append(torch_case(args, data, mode, 8, 128, args.steps))
    median = lambda xs: sorted(xs)[len(xs) // 2]
    results = {k: (median([r[0] for r in v]), median([r[1] for r in v])) for k, v in runs.items()}
    if args.repeat > 1:
        for (side, mode), v in sorted(runs.items()):
            print(f"{side} {mode}: " + ", ".join(f"{t:.0f} tokens/s {r / gib:.2f} GiB" for t, r in v))
    print(f"SmolLM2-135M-Instruct f32, batch 8 x 128 tokens, {args.steps} steps, {args.threads} threads"
          + (f", medians of {args.repeat} alternating runs" if args.repeat > 1 else ""))
    print("| case | ours tokens/s | PyTorch + PEFT tokens/s | ratio | ours peak RSS | theirs | ratio |")
    print("|---|---|---|---|---|---|---|")
    for mode in ["lora", "full"]:
        o = results[("ours", mode)]
        t = results.get(("torch", mode), (float("nan"), float("nan")))
        print(f"| {'LoRA r=8 q,v' if mode == 'lora' else 'full fine-tuning'} | {o[0]:.0f} | {t[0]:.0f} | {o[0] / t[0]:.2f}x | "
              f"{o[1] / gib:.2f} GiB | {t[1] / gib:.2f} GiB | {o[1] / t[1]:.2f}x |")
    lo, fu = results[("ours", "lora")], results[("ours", "full")]
    print(f"our LoRA step / our full step: {fu[0] / lo[0]:.2f}")
    if args.no_checkpointing:
        return
    # Activation checkpointing: batch 1 x 1024.
    long = os.path.join(tmp, "long.jsonl")
    with open(long, "w") as f:
        rng = random.Random(1)
        for _ in range(4):
            f.write(json.dumps({"text": " ".join(rng.choice("a the river castle of and music".split()) for _ in range(1400))}) + "\n")
    plain = ours(args, long, "lora", 1, 1024, 3)
    ck = ours(args, long, "lora", 1, 1024, 3, ["--gradient-checkpointing"])
    print("activation checkpointing, LoRA q,v, batch 1 x 1024, 3 steps:")
    print(f"  without: {plain[0]:.0f} tokens/s, peak RSS {plain[1] / gib:.2f} GiB")
    print(f"  with:    {ck[0]:.0f} tokens/s, peak RSS {ck[1] / gib:.2f} GiB "
          f"(RSS {ck[1] / plain[1]:.2f}x, step time {plain[0] / ck[0]:.2f}x)")


if __name__ == "__main__":
    main()
