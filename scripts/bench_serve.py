#!/usr/bin/env python3
"""Load test of `lora serve` (issue: serving many adapters on one base): N concurrent clients over
K adapters on one base, against the same requests served one at a time. Python standard library
only (no openai, no torch); loopback only; bounded (one round of N requests each way).

    cargo build --release --bin lora
    python3 scripts/bench_serve.py [--model ~/.cache/lora/models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                   [--clients 16] [--adapters 4] [--max-tokens 64] [--json OUT]

What it does:
1. trains K small adapters with `lora train` (different targets and seeds, a few steps at a high
   learning rate so each visibly changes the base's output),
2. computes every request's reference completion with `lora generate --raw` (greedy, alone),
   and counts the requests whose adapter changes the base's completion,
3. starts `lora serve` with the K adapters, warms it up, then sends the N requests
   - one at a time (each waits for the previous), and
   - all at once from N threads (released together by a barrier),
   request i using adapter i mod K, `/v1/completions`, temperature 0,
4. checks that no request failed and that every completion equals its reference, token for token
   (a mismatch is reported with both texts and makes the exit status non-zero),
5. prints generated tokens/s of both rounds, their ratio, and p50/p99 request latency.

The throughput ratio is measured within one run, so load from other processes affects both rounds;
still, run it on a quiet machine for the absolute figures.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.expanduser("~/.cache/lora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
TARGETS = ["q_proj,v_proj", "all-linear", "o_proj,down_proj", "k_proj,up_proj,gate_proj"]
SUBJECTS = ["rivers", "stars", "bread", "trains", "violins", "glaciers", "owls", "copper",
            "tides", "maps", "bees", "lanterns", "deserts", "clocks", "ferns", "harbors"]


def train_adapter(lora, model, out, targets, seed):
    """A few steps on `{"text"}` lines in the prompts' style, each adapter with its own voice.
    Every line is longer than `--max-seq-len`, so no end-of-text is ever trained: the adapters
    change the base's greedy output and keep writing to `--max-tokens`, so that each round
    generates (nearly) the same number of tokens per request and measures the batching rather
    than the longest answer."""
    voice = ["plainly", "poetically", "like a sailor", "like a scientist"][seed % 4]
    data = out + ".jsonl"
    with open(data, "w") as f:
        for i, s in enumerate(SUBJECTS):
            text = " ".join(f"Then, spoken {voice}, {s} number {n} are remembered by adapter {seed}."
                            for n in range(12))
            f.write(json.dumps({"text": f"{prompt_of(i)} {text}"}) + "\n")
    subprocess.run([lora, "train", "--model", model, "--data", data, "--out", out, "--steps", "4",
                    "--batch-size", "4", "--lr", "2e-3", "--max-seq-len", "48", "--targets",
                    targets, "--seed", str(seed), "--quiet"], check=True, capture_output=True)


def prompt_of(i):
    return f"Here are three short facts about {SUBJECTS[i % len(SUBJECTS)]}. First,"


def post(addr, path, body, timeout=600):
    req = urllib.request.Request(addr + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(addr, model, prompt, max_tokens):
    start = time.perf_counter()
    try:
        r = post(addr, "/v1/completions", {"model": model, "prompt": prompt,
                                           "max_tokens": max_tokens, "temperature": 0})
    except (urllib.error.URLError, OSError) as e:
        return {"error": str(e), "latency": time.perf_counter() - start}
    return {"text": r["choices"][0]["text"], "tokens": r["usage"]["completion_tokens"],
            "latency": time.perf_counter() - start}


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--lora", default=os.path.join(
        ROOT, os.environ.get("CARGO_TARGET_DIR", "target"), "release/lora"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    if not 1 <= args.adapters <= len(TARGETS):
        sys.exit(f"--adapters must be 1..{len(TARGETS)}")

    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    adapters = {}
    for k in range(args.adapters):
        name = f"a{k}"
        adapters[name] = os.path.join(tmp, name)
        train_adapter(args.lora, args.model, adapters[name], TARGETS[k], k + 1)
    requests = [(f"a{i % args.adapters}", prompt_of(i)) for i in range(args.clients)]
    print(f"trained {args.adapters} adapters; computing {len(requests)} references with lora generate",
          flush=True)

    references = []
    for name, prompt in requests:
        out = subprocess.run([args.lora, "generate", "--model", args.model, "--adapter", adapters[name],
                              "--raw", "--prompt", prompt, "--max-new-tokens", str(args.max_tokens)],
                             check=True, capture_output=True, text=True)
        # `lora generate` ends its output with a newline of its own.
        references.append(out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout)
    distinct = len({(p, r) for (_, p), r in zip(requests, references)})
    changed = 0
    for (name, prompt), ref in zip(requests, references):
        base = subprocess.run([args.lora, "generate", "--model", args.model, "--raw", "--prompt",
                               prompt, "--max-new-tokens", str(args.max_tokens)],
                              check=True, capture_output=True, text=True).stdout
        changed += base[:-1] != ref

    cmd = [args.lora, "serve", "--model", args.model, "--port", "0", "--max-batch", str(args.clients)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    failures = []
    try:
        addr = None
        deadline = time.time() + 300
        while time.time() < deadline and addr is None:
            m = re.search(r"listening on (http://\S+)", server.stderr.readline())
            addr = m.group(1) if m else None
        if addr is None:
            sys.exit("the server did not start")
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        complete(addr, "a0", "Warm-up:", 4)

        t0 = time.perf_counter()
        sequential = [complete(addr, name, prompt, args.max_tokens) for name, prompt in requests]
        seq_wall = time.perf_counter() - t0

        concurrent = [None] * len(requests)
        barrier = threading.Barrier(len(requests) + 1)

        def client(i):
            barrier.wait()
            concurrent[i] = complete(addr, *requests[i], args.max_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        conc_wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    for label, results in (("one at a time", sequential), ("concurrent", concurrent)):
        for i, (r, ref) in enumerate(zip(results, references)):
            if "error" in r:
                failures.append(f"{label} request {i} ({requests[i][0]}) failed: {r['error']}")
            elif r["text"] != ref:
                failures.append(f"{label} request {i} ({requests[i][0]}) differs from lora generate:\n"
                                f"  served: {r['text']!r}\n  generate: {ref!r}")

    def figures(results, wall):
        ok = [r for r in results if "error" not in r]
        tokens = sum(r["tokens"] for r in ok)
        lat = [r["latency"] for r in ok] or [float("nan")]
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99)}

    seq, conc = figures(sequential, seq_wall), figures(concurrent, conc_wall)
    report = {"model": os.path.basename(args.model), "clients": args.clients,
              "adapters": args.adapters, "max_tokens": args.max_tokens,
              "distinct_outputs": distinct, "changed_by_adapter": changed, "one_at_a_time": seq, "concurrent": conc,
              "throughput_ratio": conc["tokens_per_s"] / seq["tokens_per_s"],
              "failures": len(failures), "threads": os.cpu_count()}
    print(f"{args.clients} requests over {args.adapters} adapters on {report['model']}, "
          f"{args.max_tokens} greedy tokens at most ({distinct} distinct references; the adapter "
          f"changes the base's output on {changed} of {len(requests)})")
    print(f"{'round':<14} {'tokens':>6} {'wall s':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for label, f in (("one at a time", seq), ("concurrent", conc)):
        print(f"{label:<14} {f['tokens']:>6} {f['wall_s']:>7.1f} {f['tokens_per_s']:>9.1f} "
              f"{f['p50_s']:>7.2f} {f['p99_s']:>7.2f}")
    print(f"throughput ratio concurrent / one at a time: {report['throughput_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if failures:
        print("\n".join(failures))
        sys.exit(f"{len(failures)} failed or differing requests")
    print("every completion equals lora generate's; no failed request")


if __name__ == "__main__":
    main()
