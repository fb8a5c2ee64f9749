#!/usr/bin/env python3
"""Round trip of an adapter trained by `lora train` into Hugging Face PEFT, on the real
SmolLM2-135M-Instruct (GGUF, Q4_1, dequantized to f32 on both sides).

What it checks:
  1. `lora train` fine-tunes a LoRA adapter (r=8, alpha=16, q_proj and v_proj) for --steps steps
     on a small E2E-NLG-style data-to-text set that this script generates itself (a fixed
     `random.Random(seed)`; the user turn is `name[...], food[...], priceRange[...], area[...],
     familyFriendly[...]`, the assistant writes the description), system prompt
     "Describe the restaurant.".
  2. The adapter directory loads in PEFT (`PeftModel.from_pretrained` over transformers' GGUF
     model) with no missing adapter keys, no warnings, and a second `load_adapter` of it reports
     no missing or unexpected LoRA keys; every tensor in adapter_model.safetensors equals the
     parameter PEFT loaded it into, and every LoRA parameter PEFT created is in the file.
  3. For held-out prompts (names never seen in training), the greedy completion of
     `lora generate --adapter` equals transformers + PEFT's greedy `generate` (chat template, same
     system prompt, 40 new tokens, decoded with skip_special_tokens, stripped).
  4. The check is not vacuous: the adapter changes transformers' base completion for at least one
     prompt (the base side is generated with PEFT's `disable_adapter()`).
  Where texts differ, it reports the first diverging token and, at that step in transformers, the
  logits of both tokens and the top-2 margin. A divergence where transformers' logit margin
  between its token and ours is below --tie-tol is counted as a rounding near-tie (two f32
  implementations summing in different orders); any other difference is a real mismatch and the
  script exits 1.

Run (2-4 minutes on 2 cores; needs torch, transformers, peft, gguf - scripts/requirements.txt):

    cp target/release/lora /tmp/lora-bin
    /tmp/llmvenv/bin/python scripts/peft_roundtrip_smollm2.py --lora /tmp/lora-bin
    # options: --model GGUF (default ~/.cache/lora/models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched
    # by scripts/fetch-smollm2.sh), --steps N (default 30), --keep DIR (keep data and adapter)

Observed on 2026-11-29 (2 CPU cores, torch 2.15, transformers 5.24, peft 0.21.2): PASS in
127 s (lora train 30 steps 79 s). PEFT loaded all 120 tensors (q_proj and v_proj A/B of 30
layers) with no missing or unexpected keys, values bit-equal to the file. 5/5 completions equal,
no near-ties needed; the adapter changed the base completion on 5/5 prompts, e.g. for
"name[The Waterman], food[Japanese], priceRange[cheap], area[city centre], familyFriendly[no]":
  base:    "The Waterman is a Michelin-starred restaurant located in the heart of the city centre,
            serving exquisite Japanese cuisine with a focus on local ingredients and ..."
  adapter: "The Waterman is a cheap Japanese restaurant in the city centre area. It is not family
            friendly." (both sides: the training template, exactly)
An earlier run of this script found `lora train` learning far less than a PyTorch + PEFT loop on
the same data (loss 1.32 vs 0.02 after 30 steps): the decoder layers' RMSNorms went through
candle's fused kernel, which has no backward, so every gradient below a norm was lost. Fixed, and
`tests/train.rs` now checks the LoRA gradients through the whole model against finite
differences.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.expanduser("~/.cache/lora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
SYSTEM = "Describe the restaurant."
MAX_NEW = 40

TRAIN_NAMES = [
    "Wildwood", "The Cricketers", "Loch Fyne", "The Eagle", "Aromi", "Fitzbillies", "Green Man",
    "The Mill", "Browns Cambridge", "Zizzi", "The Punter", "Cotto", "Giraffe", "Strada",
    "The Vaults", "Bibimbap House", "The Olive Grove", "Midsummer House", "The Phoenix",
    "Alimentum", "Clowns", "The Dumpling Tree", "Taste of Cambridge", "The Golden Curry",
]
HELD_OUT_NAMES = ["The Wrestlers", "Blue Spice", "The Rice Boat", "Cocum", "The Waterman"]
FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food"]
PRICES = ["cheap", "moderately priced", "expensive", "high priced", "low priced"]
AREAS = ["riverside", "city centre"]


def record(rng, name):
    food, price, area = rng.choice(FOODS), rng.choice(PRICES), rng.choice(AREAS)
    family = rng.choice(["yes", "no"])
    prompt = (
        f"name[{name}], food[{food}], priceRange[{price}], area[{area}], "
        f"familyFriendly[{family}]"
    )
    article = "an" if price[0] in "aeiou" else "a"
    answer = (
        f"{name} is {article} {price} {food} restaurant in the {area} area. "
        f"It is {'' if family == 'yes' else 'not '}family friendly."
    )
    return prompt, answer


def write_data(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            p, a = record(rng, rng.choice(TRAIN_NAMES))
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    rng = random.Random(seed + 1)
    return [record(rng, name)[0] for name in HELD_OUT_NAMES]


def run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-4000:]}")
    return res.stdout, res.stderr


def check_adapter_keys(peft_model, adapter, caught):
    """Missing/unexpected keys and tensor equality between the file and what PEFT loaded."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    problems = [f"warning while loading: {w.message}" for w in caught]
    res = peft_model.load_adapter(adapter, adapter_name="keycheck")
    missing = [k for k in res.missing_keys if "lora_" in k]
    unexpected = list(res.unexpected_keys)
    peft_model.delete_adapter("keycheck")
    peft_model.set_adapter("default")
    if missing:
        problems.append(f"missing LoRA keys: {missing[:5]} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected[:5]} ({len(unexpected)})")
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model, adapter_name="default")
    if set(saved) != set(loaded):
        problems.append(
            f"key sets differ: only in file {sorted(set(saved) - set(loaded))[:5]}, "
            f"only in PEFT {sorted(set(loaded) - set(saved))[:5]}"
        )
    for k in set(saved) & set(loaded):
        if saved[k].shape != loaded[k].shape or not (saved[k].float() == loaded[k].float()).all():
            problems.append(f"tensor {k} differs after loading")
    return problems, len(saved)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the SmolLM2 GGUF")
    ap.add_argument("--lora", default=os.path.join(ROOT, "target", "release", "lora"),
                    help="the lora binary (copy it away from a target dir being rebuilt)")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--examples", type=int, default=240, help="training records")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    ap.add_argument("--tie-tol", type=float, default=0.01,
                    help="logit margin below which a divergence counts as a rounding near-tie")
    ap.add_argument("--keep", metavar="DIR", help="keep the data and adapter in DIR")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"{args.model} not found: run scripts/fetch-smollm2.sh")
    t0 = time.time()

    work = args.keep or tempfile.mkdtemp(prefix="peft-roundtrip-")
    os.makedirs(work, exist_ok=True)
    data, adapter = os.path.join(work, "train.jsonl"), os.path.join(work, "adapter")
    prompts = write_data(data, args.examples, args.seed)
    if os.path.exists(adapter):
        shutil.rmtree(adapter)
    print(f"[{time.time() - t0:5.0f}s] lora train: {args.steps} steps on {args.examples} records",
          flush=True)
    _, log = run([args.lora, "train", "--model", args.model, "--data", data, "--out", adapter,
         "--steps", str(args.steps), "--system", SYSTEM, "--lr", "1e-3",
         "--targets", "q_proj,v_proj", "--quiet"])
    t_train = time.time() - t0
    summary = [l for l in log.splitlines() if "last loss" in l]
    print(f"[{time.time() - t0:5.0f}s] trained ({summary[-1] if summary else 'no summary line'}); lora generate on {len(prompts)} prompts", flush=True)
    ours = []
    for p in prompts:
        out, _ = run([args.lora, "generate", "--model", args.model, "--adapter", adapter,
                   "--system", SYSTEM, "--prompt", p, "--max-new-tokens", str(MAX_NEW)])
        ours.append(out[:-1] if out.endswith("\n") else out)

    print(f"[{time.time() - t0:5.0f}s] loading transformers + PEFT", flush=True)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    d, name = os.path.dirname(os.path.abspath(args.model)), os.path.basename(args.model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter).eval()
    caught = [w for w in caught if "adapter" in str(w.message).lower() or "key" in str(w.message).lower()]
    problems, n_tensors = check_adapter_keys(model, adapter, caught)
    print(f"[{time.time() - t0:5.0f}s] PEFT loaded {n_tensors} tensors; key problems: "
          f"{problems or 'none'}", flush=True)

    def encode(p):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt").input_ids

    @torch.no_grad()
    def greedy(ids):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:]

    equal = ties = real = changed = 0
    for i, (p, our) in enumerate(zip(prompts, ours)):
        ids = encode(p)
        new = greedy(ids)
        hf = tok.decode(new, skip_special_tokens=True).strip()
        with model.disable_adapter():
            base_text = tok.decode(greedy(ids), skip_special_tokens=True).strip()
        changed += base_text != hf
        print(f"\n[{i}] {p}\n  base:         {base_text!r}\n  PEFT adapter: {hf!r}\n"
              f"  lora adapter: {our.strip()!r}")
        if our.strip() == hf:
            equal += 1
            continue
        # First diverging token: our text re-tokenized against transformers' generated ids.
        hf_ids = [t for t in new.tolist() if t not in tok.all_special_ids]
        our_ids = tok(our.strip(), add_special_tokens=False).input_ids
        k = next((j for j, (a, b) in enumerate(zip(hf_ids, our_ids)) if a != b),
                 min(len(hf_ids), len(our_ids)))
        hf_t = new.tolist()[k] if k < len(new) else None
        our_t = our_ids[k] if k < len(our_ids) else tok.eos_token_id
        with torch.no_grad():
            prefix = torch.cat([ids, new[:k].unsqueeze(0)], dim=1)
            logits = model(prefix).logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        gap = (logits[hf_t] - logits[our_t]).item() if hf_t is not None else float("inf")
        print(f"  DIFFER at new token {k}: transformers {tok.decode([hf_t]) if hf_t is not None else None!r}"
              f" ({hf_t}, logit {logits[hf_t].item() if hf_t is not None else float('nan'):.4f}), "
              f"lora {tok.decode([our_t])!r} ({our_t}, logit {logits[our_t].item():.4f}); "
              f"top-2 margin {(top2.values[0] - top2.values[1]).item():.4f}")
        if gap < args.tie_tol:
            ties += 1
            print(f"  -> near-tie (margin {gap:.4f} < {args.tie_tol}): rounding, not a mismatch")
        else:
            real += 1
            print(f"  -> REAL MISMATCH (margin {gap:.4f})")

    n = len(prompts)
    print(f"\nSUMMARY: {equal}/{n} completions equal, {ties} near-ties, {real} real mismatches; "
          f"adapter changed the base output on {changed}/{n} prompts; PEFT key problems: "
          f"{len(problems)}; train {t_train:.0f} s, total {time.time() - t0:.0f} s")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    failed = real or problems or changed == 0
    if changed == 0:
        print("FAIL: the adapter changed no completion; the comparison is vacuous")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
