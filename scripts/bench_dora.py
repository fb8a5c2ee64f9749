#!/usr/bin/env python3
"""DoRA's forward overhead over plain LoRA, ours and PEFT's, in one run (a few seconds).

Runs `cargo bench --bench dora` (benches/dora.rs) and the same cases in PyTorch + PEFT, then
prints a Markdown table for BENCHMARKS.md. Cases: a 768 x 768 linear layer with bias on 8 x 128
tokens and a 4096 x 4096 one on 1 x 256 tokens, f32, CPU, r = 8, alpha = 16, non-zero B, inference
(no_grad / no graph); the base linear, LoRA unmerged and DoRA unmerged (PEFT's
`use_dora=True`, magnitudes moved off their initial norms). Each side times its cases in turn,
rotating which goes first (round 0 a warm-up), and takes medians.

    PYTHON=/tmp/peftvenv/bin/python; $PYTHON scripts/bench_dora.py      # BENCH_THREADS (default 2)
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)
RANK, ALPHA = 8, 16
CASES = [("d768", 768, (8, 128), 40), ("d4096", 4096, (1, 256), 15)]


class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin


def peft_layer(d, use_dora, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"], init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(Wrap(nn.Linear(d, d)), config).eval()
    layer = model.base_model.model.lin
    if use_dora:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1.1)
    return layer


def interleaved(rounds, cases):
    times = {name: [] for name, _ in cases}
    for r in range(rounds + 1):
        for i in range(len(cases)):
            name, fn = cases[(i + r) % len(cases)]
            t0 = time.perf_counter()
            fn()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peft_side():
    out = {}
    for name, d, shape, rounds in CASES:
        torch.manual_seed(1)
        x = torch.randn(*shape, d)
        lora = peft_layer(d, False, 2)
        dora = peft_layer(d, True, 2)
        with torch.no_grad():
            dora.base_layer.load_state_dict(lora.base_layer.state_dict())
            base = lora.base_layer
            out[name] = interleaved(rounds, [("base", lambda: base(x)), ("lora", lambda: lora(x)), ("dora", lambda: dora(x))])
    return out


def rust_side():
    env = {**os.environ, "RAYON_NUM_THREADS": str(THREADS)}
    p = subprocess.run(["cargo", "bench", "--bench", "dora"], cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE, text=True)
    out = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[row["case"]] = {k[: -len("_ns")]: v / 1e9 for k, v in row.items() if k.endswith("_ns")}
    return out


def main():
    import peft

    ours = rust_side()
    theirs = peft_side()
    print(f"<!-- scripts/bench_dora.py, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, {THREADS} threads, torch {torch.__version__}, peft {peft.__version__} -->")
    print("| forward, f32, r=8 | ours LoRA | ours DoRA | ours DoRA / LoRA | PEFT LoRA | PEFT DoRA | PEFT DoRA / LoRA | ours DoRA / PEFT DoRA |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d, shape, _ in CASES:
        o, t = ours[name], theirs[name]
        ms = lambda s: f"{s * 1e3:.2f} ms"
        print(
            f"| {d}x{d}, {shape[0]}x{shape[1]} tokens | {ms(o['lora'])} | {ms(o['dora'])} | {o['dora'] / o['lora']:.2f}x "
            f"| {ms(t['lora'])} | {ms(t['dora'])} | {t['dora'] / t['lora']:.2f}x | {o['dora'] / t['dora']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
