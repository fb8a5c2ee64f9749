#!/usr/bin/env python3
"""QLoRA on the CPU: `lora train` on SmolLM2-135M-Instruct's Q4_1 GGUF with the base kept
quantized (`--dtype quantized`) against the same GGUF dequantized to f32 (`--dtype f32`): same
data, batch, steps, seed and learning rate, one process per case (so each peak RSS is its own,
model loading included), without and with `--gradient-checkpointing`.

    python3 scripts/bench_qlora.py [--model GGUF] [--steps 20] [--batch-size 8]

Reports per case: peak RSS, training tokens/s and seconds per step (wall time of the whole
process over the steps: loading and the final eval included, the same for both sides), the
held-out loss after the last step, and the ratios quantized / f32. Goals (the QLoRA issue):
peak RSS <= 0.5x, held-out loss within 5%.

Data: the main example's task (E2E-NLG-style data-to-text, generated here with the same fields and
house style as `examples/smollm2/data.rs`, a Python port with its own random draw): 320 training
conversations, 48 held-out ones with restaurant names never seen in training. Needs the release
binary (`cargo build --release --bin lora`); standard library only.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN_NAMES = ["The Eagle", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Clowns", "Cocum",
               "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada",
               "Zizzi", "Taste of Cambridge", "The Cambridge Blue", "The Cricketers", "The Dumpling Tree",
               "Wildwood", "The Golden Curry", "The Mill", "The Olive Grove", "The Phoenix", "The Plough",
               "The Punter"]
HELD_OUT_NAMES = ["The Rice Boat", "The Vaults", "The Waterman", "Browns Cambridge", "The Wrestlers",
                  "Travellers Rest Beefeater", "The Twenty Two", "Cotto Verde"]
FOODS = ["French", "Italian", "Chinese", "Indian", "Japanese", "English", "Thai"]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
PRICES = [("cheap", "low"), ("moderate", "mid-range"), ("high", "premium")]
AREAS = ["riverside", "city centre"]
SYSTEM = "Describe the restaurant in one sentence."


def record(rng, names):
    name, eat, food, area = rng.choice(names), rng.choice(EAT_TYPES), rng.choice(FOODS), rng.choice(AREAS)
    price, tier = rng.choice(PRICES)
    family = rng.random() < 0.5
    mr = (f"name[{name}], eatType[{eat}], food[{food}], priceRange[{price}], area[{area}], "
          f"familyFriendly[{'yes' if family else 'no'}]")
    text = (f"{name} is a {eat} serving {food} food at {tier} prices in the {area}. "
            + ("Kids are welcome." if family else "It is not for kids."))
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": mr},
                         {"role": "assistant", "content": text}]}


def write_data(dir_, seed=0):
    rng = random.Random(seed)
    paths = {}
    for split, names, n in [("train", TRAIN_NAMES, 320), ("held_out", HELD_OUT_NAMES, 48)]:
        p = Path(dir_) / f"{split}.jsonl"
        p.write_text("".join(json.dumps(record(rng, names)) + "\n" for _ in range(n)))
        paths[split] = str(p)
    return paths


def default_model():
    cache = Path(os.environ.get("LORA_MODELS_DIR", Path.home() / ".cache/lora/models"))
    return str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf")


def train(args, data, dtype, checkpointing):
    binary = os.environ.get("LORA_BIN", str(ROOT / os.environ.get("CARGO_TARGET_DIR", "target") / "release/lora"))
    out = tempfile.mkdtemp()
    cmd = ["/usr/bin/time", "-v", binary, "train", "--model", args.model, "--data", data["train"],
           "--eval", data["held_out"], "--out", out, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--lr", "2e-3", "--targets", "q_proj,v_proj", "--system", SYSTEM,
           "--dtype", dtype, "--quiet"]
    if checkpointing:
        cmd.append("--gradient-checkpointing")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)))
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"lora train failed:\n{r.stderr}")
    return {
        "rss": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024,
        "tps": float(re.search(r"([0-9.]+) tokens/s", r.stderr).group(1)),
        "loss": float(re.search(r"eval loss ([0-9.]+)", r.stderr).group(1)),
        "step": wall / args.steps,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"{args.model} not found: run scripts/fetch-smollm2.sh")
    data = write_data(tempfile.mkdtemp())
    print(f"model {args.model}, {args.steps} steps of {args.batch_size} conversations, LoRA r=8 on "
          f"q_proj, v_proj, lr 2e-3, {args.threads} threads")
    print("| checkpointing | base | peak RSS | tokens/s | s/step | held-out loss |")
    print("|---|---|---|---|---|---|")
    for ck in (False, True):
        res = {}
        for dtype in ("f32", "quantized"):
            r = res[dtype] = train(args, data, dtype, ck)
            print(f"| {'yes' if ck else 'no'} | {'Q4_1 kept quantized' if dtype == 'quantized' else 'dequantized to f32'} "
                  f"| {r['rss'] / 2**20:.0f} MiB | {r['tps']:.0f} | {r['step']:.2f} | {r['loss']:.4f} |", flush=True)
        q, f = res["quantized"], res["f32"]
        print(f"| {'yes' if ck else 'no'} | **quantized / f32** | **{q['rss'] / f['rss']:.2f}x** | "
              f"{q['tps'] / f['tps']:.2f}x | {q['step'] / f['step']:.2f}x | "
              f"{(q['loss'] - f['loss']) / f['loss'] * 100:+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
