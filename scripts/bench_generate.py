"""`lora generate` beside transformers' `generate` on the same GGUF (SmolLM2-135M-Instruct Q4_1,
dequantized to f32 on both sides), the same threads, in one run. Run through
`scripts/bench_generate.sh`; the modes are:

  hf GGUF       transformers' side alone: one forward over each chat prompt (prompt tokens/s) and
                greedy `generate` of exactly --new-tokens tokens (generation tokens/s), medians of
                --runs runs after a warm-up; prints JSON.
  hf-serve GGUF the same, loaded once, one timed run per prompt read from stdin (for `report`,
                which alternates it with `lora generate` run by run).
  hf-rss GGUF   load the GGUF to f32 and generate 1 token for "hi" (the peak RSS probe).
  params GGUF   the parameters in the GGUF (sum of its tensors' element counts); prints JSON.
  report        runs both sides (`lora generate` as processes, this script's `hf-serve` mode), the peak
                RSS probes under /usr/bin/time -v, and prints a markdown table; --write FILE puts it
                into FILE between the `bench-generate:begin` / `bench-generate:end` markers.

Both sides use the same definitions, those `lora generate` prints on stderr: prompt tokens/s =
prompt tokens / time to the first new token, generation tokens/s = (new tokens - 1) / time from
the first new token to the last. transformers' prompt figure is also given as a bare forward over
the prompt (no `generate` set-up), the figure the table uses. Medians of --runs runs after one
warm-up. `lora generate` stops at EOS (it has no flag to ignore it): the prompts are chosen for
long greedy answers, and the token counts are reported. The `hf*` and `params` modes need torch,
transformers and gguf (scripts/requirements.txt); `report` needs only the standard library.
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cargo's target directory: $CARGO_TARGET_DIR when set, else target/.
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
BEGIN, END = "<!-- bench-generate:begin -->", "<!-- bench-generate:end -->"
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works in detail.",
    "List ten countries in Europe and their capitals.",
]


def log(msg):
    print(f"bench-generate: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- transformers' side


def load_hf(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    d, name = os.path.split(os.path.abspath(gguf_path))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model, time.perf_counter() - t0


def chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def greedy(model, tok, ids, n, streamer=None):
    return model.generate(
        ids,
        attention_mask=ids.new_ones(ids.shape),
        max_new_tokens=n,
        min_new_tokens=n,  # EOS cannot end it early
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.eos_token_id,
        streamer=streamer,
    )


class HF:
    """transformers' side, loaded once: `once(prompt)` times one bare forward over the chat prompt
    and one greedy `generate` of exactly `n` new tokens."""

    def __init__(self, gguf_path, n):
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            """Times each new token as `generate` hands it out (its first `put` is the prompt)."""

            def __init__(self):
                self.times, self.seen_prompt = [], False

            def put(self, value):
                if self.seen_prompt:
                    self.times.append(time.perf_counter())
                self.seen_prompt = True

            def end(self):
                pass

        self.torch, self.Clock, self.n = torch, Clock, n
        self.tok, self.model, load_s = load_hf(gguf_path)
        self.info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
            "load_s": load_s,
        }

    def once(self, prompt):
        tok = self.tok
        with self.torch.inference_mode():
            ids = chat_ids(tok, prompt)
            t0 = time.perf_counter()
            self.model(input_ids=ids, use_cache=True)
            fwd = time.perf_counter() - t0
            clock = self.Clock()
            t0 = time.perf_counter()
            seq = greedy(self.model, tok, ids, self.n, clock)
            total = time.perf_counter() - t0
        new = seq[0, ids.shape[1] :].tolist()
        p, n = ids.shape[1], len(new)
        ttft, gen = clock.times[0] - t0, clock.times[-1] - clock.times[0]
        return {
            "prompt_tokens": p,
            "new_tokens": n,
            "forward_s": fwd,
            "prompt_tps": p / fwd,
            "ttft_s": ttft,
            "prompt_tps_ttft": p / ttft,
            "gen_s": gen,
            "gen_tps": (n - 1) / gen,
            "generate_s": total,
            # The other definition: all new tokens over generate's time less the bare forward's.
            "gen_tps_minus_forward": n / (total - fwd),
            "eos_at": next((i for i, t in enumerate(new) if t == tok.eos_token_id), None),
            "text": tok.decode(new, skip_special_tokens=False),
        }


def hf_bench(args):
    """Standalone: medians of --runs runs after a warm-up, per prompt; prints JSON."""
    hf = HF(args.gguf, args.new_tokens)
    out = {**hf.info, "prompts": []}
    for prompt in PROMPTS:
        runs = [hf.once(prompt) for _ in range(args.runs + 1)][1:]
        res = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
        res.update(prompt=prompt, prompt_tokens=runs[0]["prompt_tokens"], new_tokens=runs[0]["new_tokens"], text=runs[0]["text"], runs=runs)
        out["prompts"].append(res)
        log(f"transformers: {prompt!r}: {res['prompt_tps']:.1f} prompt tok/s, {res['gen_tps']:.1f} gen tok/s")
    print(json.dumps(out))


def hf_serve(args):
    """For the driver: loads once, prints its versions as a JSON line, then answers each prompt
    read from stdin (one JSON string a line) with one timed run as a JSON line."""
    hf = HF(args.gguf, args.new_tokens)
    print(json.dumps(hf.info), flush=True)
    for line in sys.stdin:
        print(json.dumps(hf.once(json.loads(line))), flush=True)


def hf_rss(args):
    import torch

    tok, model, load_s = load_hf(args.gguf)
    with torch.inference_mode():
        greedy(model, tok, chat_ids(tok, "hi"), 1)
    print(json.dumps({"load_s": load_s}))


def params(args):
    import gguf
    import numpy as np

    r = gguf.GGUFReader(args.gguf)
    n = sum(int(np.prod([int(x) for x in t.shape])) for t in r.tensors)
    names = [t.name for t in r.tensors]
    print(json.dumps({"params": n, "tensors": len(names), "tied": "output.weight" not in names, "f32_bytes": 4 * n}))


# ---------------------------------------------------------------- the driver


LINE = re.compile(
    r"prompt: (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\); generated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\), stop: (\w+)"
)


def run_ours(lora, gguf_path, prompt, n):
    p = subprocess.run(
        [lora, "generate", "--model", gguf_path, "--prompt", prompt, "--max-new-tokens", str(n)],
        env={**os.environ, "RAYON_NUM_THREADS": str(THREADS)},
        capture_output=True,
        text=True,
        check=True,
    )
    m = LINE.search(p.stderr)
    if not m:
        raise RuntimeError(f"no timing line in `lora generate`'s stderr:\n{p.stderr}")
    loaded = re.search(r"loaded .* in ([\d.]+) s", p.stderr)
    return {
        "load_s": float(loaded[1]) if loaded else None,
        "prompt_tokens": int(m[1]),
        "ttft_s": float(m[2]),
        "prompt_tps": float(m[3]),
        "new_tokens": int(m[4]),
        "gen_s": float(m[5]),
        "gen_tps": float(m[6]),
        "stop": m[7],
        "text": p.stdout[:-1] if p.stdout.endswith("\n") else p.stdout,
    }


def peak_rss(cmd, env):
    """Peak RSS in bytes: /usr/bin/time -v's "Maximum resident set size" (wait4's ru_maxrss)."""
    env = {**os.environ, **env}
    if shutil.which("/usr/bin/time"):
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True, check=True)
        return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)[1]) * 1024
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{cmd} failed")
    return usage.ru_maxrss * 1024


def common_prefix(a, b):
    """Characters the two completions share from the start."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def report(args):
    py, lora, g = args.python, args.lora, args.gguf
    loads = [os.getloadavg()[0]]
    py_env = {"BENCH_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    info = json.loads(subprocess.run([py, __file__, "params", g], capture_output=True, text=True, check=True).stdout)

    # Interleaved, run by run: `lora generate` (a process per run) then transformers (loaded once,
    # in a child process answering on a pipe), so a burst of load on a shared machine hits both.
    # One warm-up round first.
    log("loading transformers (~30 s) ...")
    server = subprocess.Popen(
        [py, __file__, "hf-serve", g, "--new-tokens", str(args.new_tokens)],
        env={**os.environ, **py_env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    hf = json.loads(server.stdout.readline())
    ours, theirs = {p: [] for p in PROMPTS}, {p: [] for p in PROMPTS}
    for r in range(args.runs + 1):
        for p in PROMPTS:
            o = run_ours(lora, g, p, args.new_tokens)
            server.stdin.write(json.dumps(p) + "\n")
            server.stdin.flush()
            t = json.loads(server.stdout.readline())
            log(
                f"round {r} {p[:24]!r}: prompt tok/s {o['prompt_tps']:.0f} / {t['prompt_tps']:.0f}, "
                f"generation tok/s {o['gen_tps']:.1f} / {t['gen_tps']:.1f}, tokens {o['new_tokens']} ({o['stop']}) / {t['new_tokens']} (ours / transformers)"
            )
            if r:
                ours[p].append(o)
                theirs[p].append(t)
        loads.append(os.getloadavg()[0])
    server.stdin.close()
    if server.wait():
        raise RuntimeError("transformers' side failed")

    rss = {"ours": [], "hf": []}
    for _ in range(args.rss_runs):
        rss["ours"].append(peak_rss([lora, "generate", "--model", g, "--prompt", "hi", "--max-new-tokens", "1"], {"RAYON_NUM_THREADS": str(THREADS)}))
        rss["hf"].append(peak_rss([py, __file__, "hf-rss", g], py_env))
    loads.append(os.getloadavg()[0])

    # The table.
    med = statistics.median
    rows, summary = [], {"ours_prompt": [], "hf_prompt": [], "ours_gen": [], "hf_gen": []}
    for p in PROMPTS:
        o, t = ours[p], theirs[p]
        op, og = med(x["prompt_tps"] for x in o), med(x["gen_tps"] for x in o)
        tp, tg = med(x["prompt_tps"] for x in t), med(x["gen_tps"] for x in t)
        counts = "/".join(map(str, sorted({x["new_tokens"] for x in o})))
        same = common_prefix(o[0]["text"], t[0]["text"])
        rows.append(
            f"| {p} | {o[0]['prompt_tokens']} / {t[0]['prompt_tokens']} | {op:.0f} | {tp:.0f} | {op / tp:.2f}x "
            f"| {og:.1f} | {tg:.1f} | {og / tg:.2f}x | {counts} ({o[0]['stop']}) / {t[0]['new_tokens']} "
            f"| {same} of {len(o[0]['text'])} |"
        )
        summary["ours_prompt"].append(op)
        summary["hf_prompt"].append(tp)
        summary["ours_gen"].append(og)
        summary["hf_gen"].append(tg)
    gm = lambda xs: statistics.geometric_mean(xs)
    gen_ratio = gm(summary["ours_gen"]) / gm(summary["hf_gen"])
    prompt_ratio = gm(summary["ours_prompt"]) / gm(summary["hf_prompt"])
    o_rss, h_rss = med(rss["ours"]), med(rss["hf"])
    f32 = info["f32_bytes"]
    rss_ratio = o_rss / f32
    verdict = lambda ok: "met" if ok else "**missed**"
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    lora_version = subprocess.run([lora, "--version"], capture_output=True, text=True).stdout.strip() or "lora"
    built = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(os.path.getmtime(lora)))
    rustc = subprocess.run(["rustc", "-V"], cwd=ROOT, capture_output=True, text=True).stdout.strip() if shutil.which("rustc") else ""
    lora_version = f"{lora_version} (binary built {built})" + (f", {rustc}" if rustc else "")
    lines = [
        BEGIN,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `scripts/bench_generate.sh` on: {cpu}, {os.cpu_count()} cores, "
        f"{mem_gib:.1f} GiB, Linux {platform.release()}; {lora_version}; Python {hf.get('python', platform.python_version())}, "
        f"torch {hf['torch']}, transformers {hf['transformers']}. CPU, f32 (GGUF dequantized on load), {THREADS} threads on both "
        f"sides, greedy, {args.new_tokens} new tokens at most, medians of {args.runs} runs after a warm-up. Load average (1 min) "
        "during the run: " + ", ".join(f"{x:.1f}" for x in loads) + ".",
        "",
        "Prompt tok/s: ours = prompt tokens / time to the first new token, as `lora generate` prints it; transformers' = "
        "prompt tokens / one bare `model(input_ids)` forward (its time to the first token of `generate` is below). "
        "Generation tok/s, both sides: (new tokens - 1) / time from the first new token to the last (transformers' timed "
        "with a streamer). Ratios are ours / transformers (higher is better for ours). Each run of ours is a fresh process; "
        "the runs alternate with transformers' (loaded once) so load bursts hit both.",
        "",
        "| prompt | prompt tokens (ours / tf) | prompt tok/s, ours | prompt tok/s, transformers | ratio "
        "| generation tok/s, ours | generation tok/s, transformers | ratio | new tokens (ours / tf) | same text (chars) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        f"| **geometric mean** | | {gm(summary['ours_prompt']):.0f} | {gm(summary['hf_prompt']):.0f} | **{prompt_ratio:.2f}x** "
        f"| {gm(summary['ours_gen']):.1f} | {gm(summary['hf_gen']):.1f} | **{gen_ratio:.2f}x** | | |",
        "",
        f"| peak RSS, load + 1 token | ours | transformers | ours / transformers | f32 weights ({info['params']:,} parameters x 4 B) | ours / f32 weights |",
        "|---|---|---|---|---|---|",
        f"| `generate --prompt hi --max-new-tokens 1` | {mib(o_rss)} | {mib(h_rss)} | {o_rss / h_rss:.2f}x | {mib(f32)} | {rss_ratio:.2f}x |",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| generation tokens/s >= 2x transformers' | {gen_ratio:.2f}x | {verdict(gen_ratio >= 2.0)} |",
        f"| peak RSS of the f32 load <= 1.3x the f32 weights | {rss_ratio:.2f}x | {verdict(rss_ratio <= 1.3)} |",
        "",
        "Peak RSS runs (" + str(args.rss_runs) + " each, alternating): ours " + ", ".join(mib(x) for x in rss["ours"])
        + "; transformers " + ", ".join(mib(x) for x in rss["hf"]) + f". Load time (GGUF to f32 weights + tokenizer, as each side reports it): ours "
        + ", ".join(f"{x['load_s']:.2f} s" for p in PROMPTS for x in ours[p] if x["load_s"] is not None)
        + f"; transformers {hf['load_s']:.1f} s (`AutoTokenizer` + `AutoModelForCausalLM.from_pretrained`, once).",
        "transformers' prompt tokens/s measured as `lora generate` does (time to the first token of `generate`): "
        + ", ".join(f"{med(x['prompt_tps_ttft'] for x in theirs[p]):.0f}" for p in PROMPTS)
        + "; its generation tokens/s as all new tokens over `generate`'s time less one bare forward: "
        + ", ".join(f"{med(x['gen_tps_minus_forward'] for x in theirs[p]):.1f}" for p in PROMPTS)
        + ".",
        "",
        END,
    ]
    table = "\n".join(lines)
    print(table)
    raw = {"params": info, "hf": hf, "ours": ours, "transformers": theirs, "rss": rss, "loads": loads}
    data = os.path.join(TARGET, "bench-data")
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "generate.json"), "w") as f:
        json.dump(raw, f, indent=1)
    if args.write:
        old = open(args.write).read()
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + table + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip() + "\n\n" + table + "\n"
        with open(args.write, "w") as f:
            f.write(new)
        log(f"wrote {args.write}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("hf", "hf-serve", "hf-rss", "params"):
        s = sub.add_parser(mode)
        s.add_argument("gguf")
        s.add_argument("--runs", type=int, default=3)
        s.add_argument("--new-tokens", type=int, default=64)
    s = sub.add_parser("report")
    s.add_argument("--gguf", required=True)
    s.add_argument("--lora", default=os.path.join(TARGET, "release", "lora"))
    s.add_argument("--python", default=sys.executable, help="the Python with torch, transformers and gguf")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--rss-runs", type=int, default=3)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--write", metavar="FILE", help="put the table into FILE between the bench-generate markers")
    args = ap.parse_args()
    {"hf": hf_bench, "hf-serve": hf_serve, "hf-rss": hf_rss, "params": params, "report": report}[args.mode](args)


if __name__ == "__main__":
    main()
