"""The PyTorch + PEFT half of the benchmarks: the same cases and shapes as `benches/lora.rs`.

`scripts/bench.sh` runs this beside `cargo bench` and writes BENCHMARKS.md. Alone:

    python scripts/bench_peft.py micro --out peft.json     # forward, merge, train step, adapter I/O
    python scripts/bench_peft.py micro --out mixed.json --only mixed_batch   # mixed-adapter batches
    python scripts/bench_peft.py gen-merge DIR             # a random ~324 MB Llama-style model + rank-16 adapter
    python scripts/bench_peft.py merge-process DIR OUT     # merge_and_unload + save_pretrained, as users run it

CPU, f32, `torch.set_num_threads(2)` (override with BENCH_THREADS). Every timing is the median of
per-call times after a warm-up. Versions: scripts/requirements.txt (torch 2.15.0, peft 0.21.2).
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

RANK, ALPHA = 8, 16


def median_time(fn, min_runs=10, min_seconds=2.0, warmup_seconds=0.5, setup=None):
    """Median seconds of one call of `fn` (after `setup`, untimed, when given)."""
    t_end = time.perf_counter() + warmup_seconds
    while True:
        if setup:
            setup()
        fn()
        if time.perf_counter() > t_end:
            break
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(prefix, rounds, cases, results):
    """Runs the cases (`(name, fn)` or `(name, fn, untimed_setup)`) in turn, `rounds` times
    (rotating which goes first), and records each case's median as `<prefix>/<case>/interleaved`:
    a burst of load hits all cases alike."""
    times = {case[0]: [] for case in cases}
    for r in range(rounds + 1):
        for i in range(len(cases)):
            name, fn, *setup = cases[(i + r) % len(cases)]
            for f in setup:
                f()
            t0 = time.perf_counter()
            fn()
            if r > 0:  # round 0 is a warm-up
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        results[f"{prefix}/{name}/interleaved"] = statistics.median(t)


def lora_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, **kw)


class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin


def peft_linear(d, init_b=True):
    """A PEFT `lora.Linear` around an `nn.Linear(d, d)` with bias; B random (non-zero)."""
    from peft import get_peft_model

    model = get_peft_model(Wrap(nn.Linear(d, d)), lora_config(target_modules=["lin"], init_lora_weights=not init_b))
    return model.base_model.model.lin


def bench_forward(results):
    for name, d, shape in [("d768", 768, (8, 128)), ("d4096", 4096, (1, 256))]:
        torch.manual_seed(1)
        x = torch.randn(*shape, d)
        layer = peft_linear(d)
        base = layer.base_layer
        runs = dict(min_runs=20, min_seconds=3.0)
        with torch.no_grad():
            results[f"forward/{name}/base"] = median_time(lambda: base(x), **runs)
            results[f"forward/{name}/unmerged"] = median_time(lambda: layer(x), **runs)
            layer.merge()
            results[f"forward/{name}/merged"] = median_time(lambda: layer(x), **runs)
            layer.unmerge()
            merged = peft_linear(d)
            merged.load_state_dict(layer.state_dict())
            merged.merge()
            cases = [("base", lambda: base(x)), ("unmerged", lambda: layer(x)), ("merged", lambda: merged(x))]
            interleaved(f"forward/{name}", 15 if d > 1024 else 40, cases, results)


def bench_merge(results):
    torch.manual_seed(2)
    layer = peft_linear(4096)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        results["merge/d4096/rank_product"] = median_time(lambda: b @ a, min_runs=20)
        # merge() alone is timed; unmerge() (subtracting the delta again) runs untimed before it.
        state = {"merged": False}

        def unmerge():
            if state["merged"]:
                layer.unmerge()

        def merge():
            layer.merge()
            state["merged"] = True

        results["merge/d4096/merge"] = median_time(merge, min_runs=20, setup=unmerge)
        interleaved("merge/d4096", 20, [("rank_product", lambda: b @ a), ("merge", merge, unmerge)], results)


# The GPT-style decoder of benches/lora.rs (examples/finetune/model.rs).
VOCAB, CTX, D, N_LAYER, N_HEAD, BATCH = 256, 128, 768, 4, 12, 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, mask):
        b, t, d = x.shape
        hd = d // N_HEAD

        def heads(y):
            return y.view(b, t, N_HEAD, hd).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd) + mask
        att = att.softmax(-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(D), Attention(), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(approximate="tanh"), nn.Linear(4 * D, D))

    def forward(self, x, mask):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(CTX, D)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f, self.lm_head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids, mask):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.h:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def bench_train_step(results):
    from peft import get_peft_model

    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, CTX))
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)
    for mode in ["lora", "full"]:
        model = Gpt()
        if mode == "lora":
            model = get_peft_model(model, lora_config(target_modules=["q_proj", "v_proj"]))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            logits = model(ids, mask)
            loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        results[f"train_step/gpt4_d768/{mode}"] = median_time(step, min_runs=10, min_seconds=5.0, warmup_seconds=2.0)
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
        results[f"train_step/gpt4_d768/{mode}_optimizer_state_bytes"] = state


class QvLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = _shape_only_linear(d), _shape_only_linear(d)


def _shape_only_linear(d):
    """An `nn.Linear(d, d)` whose weight is a broadcast zero: the adapter needs only its shape."""
    lin = nn.Linear(1, 1, bias=False)
    lin.weight = nn.Parameter(torch.zeros(1, 1).expand(d, d), requires_grad=False)
    lin.in_features = lin.out_features = d
    return lin


class QvModel(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.layers = nn.ModuleList(QvLayer(d) for _ in range(n))


def bench_adapter_io(results):
    from peft import get_peft_model

    torch.manual_seed(4)
    model = get_peft_model(QvModel(32, 4096), lora_config(target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter")
        model.save_pretrained(path)
        results["adapter_io/l32_d4096/save"] = median_time(lambda: model.save_pretrained(path), min_runs=20)

        def load():
            model.load_adapter(path, adapter_name="bench")

        def drop():
            if "bench" in model.peft_config:
                model.delete_adapter("bench")

        results["adapter_io/l32_d4096/load"] = median_time(load, min_runs=20, setup=drop)


def bench_mixed_batch(results):
    """PEFT's mixed-adapter batch, `layer(x, adapter_names=[...])` (a loop over the sub-batch of
    each adapter), on a 768 x 768 layer holding n adapters; 64 rows of 1 or 16 tokens, row i with
    adapter i mod n: the shapes of `mixed_batch/...` in benches/lora.rs."""
    from peft import get_peft_model

    d, batch = 768, 64
    for tokens in [1, 16]:
        for n in [1, 4, 16, 64]:
            torch.manual_seed(6)
            cfg = lora_config(target_modules=["lin"], init_lora_weights=False)
            model = get_peft_model(Wrap(nn.Linear(d, d)), cfg, adapter_name="a0")
            for i in range(1, n):
                model.add_adapter(f"a{i}", lora_config(target_modules=["lin"], init_lora_weights=False))
            layer = model.base_model.model.lin
            names = [f"a{i % n}" for i in range(batch)]
            x = torch.randn(batch, d) if tokens == 1 else torch.randn(batch, tokens, d)
            with torch.no_grad():
                results[f"mixed_batch/t{tokens}/adapter_names/{n}"] = median_time(
                    lambda: layer(x, adapter_names=names), min_runs=20, min_seconds=1.5
                )


MERGE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gen_merge(out):
    """A random Llama-style model (81 M parameters, 324 MB in f32) and a rank-16 adapter on every
    projection, both with non-zero random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=5,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=MERGE_TARGETS, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(os.path.join(out, "adapter"))


def merge_process(model_dir, out):
    """What a user runs: load, merge_and_unload, save. Prints the in-process phases as JSON."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(model_dir, "adapter"))
    t1 = time.perf_counter()
    merged = model.merge_and_unload()
    t2 = time.perf_counter()
    merged.save_pretrained(out)
    t3 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "merge_s": t2 - t1, "save_s": t3 - t2, "merge_save_s": t3 - t1}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--out", required=True)
    m.add_argument("--only", default="", help="comma-separated: forward,merge,train_step,adapter_io,mixed_batch")
    g = sub.add_parser("gen-merge")
    g.add_argument("dir")
    mp = sub.add_parser("merge-process")
    mp.add_argument("dir")
    mp.add_argument("out")
    args = p.parse_args()
    if args.cmd == "gen-merge":
        gen_merge(args.dir)
    elif args.cmd == "merge-process":
        merge_process(args.dir, args.out)
    else:
        import peft

        results = {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads()}
        cases = {"forward": bench_forward, "merge": bench_merge, "train_step": bench_train_step, "adapter_io": bench_adapter_io, "mixed_batch": bench_mixed_batch}
        only = [c for c in args.only.split(",") if c] or list(cases)
        for name in only:
            print(f"bench_peft: {name}", file=sys.stderr, flush=True)
            cases[name](results)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
