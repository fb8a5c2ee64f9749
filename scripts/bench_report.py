"""Runs the Rust benchmarks (criterion, `benches/lora.rs`) and the PyTorch + PEFT ones
(`scripts/bench_peft.py`) case by case, one after the other, and writes the table of ratios into
BENCHMARKS.md between the `bench:begin` / `bench:end` markers (the text around them is kept).

Run through `scripts/bench.sh`, which picks the Python environment. Standard library only.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cargo's target directory: $CARGO_TARGET_DIR when set (relative to the repository root), else
# target/. Criterion results and the release binary live there.
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))
DATA = os.path.join(TARGET, "bench-data")
MERGE_DIR = os.path.join(DATA, "merge-model")
THREADS = os.environ.get("BENCH_THREADS", "2")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, **kw):
    log(" ".join(cmd))
    return subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, **(env or {})}, **kw)


def cargo_env():
    return {"RAYON_NUM_THREADS": THREADS, "LORA_BENCH_MERGE_DIR": MERGE_DIR}


def criterion_results():
    """`{full_id: median seconds}` from criterion's last run."""
    out = {}
    for path in glob.glob(os.path.join(TARGET, "criterion", "*", "*", "new", "benchmark.json")):
        with open(path) as f:
            full_id = json.load(f)["full_id"]
        with open(os.path.join(os.path.dirname(path), "estimates.json")) as f:
            out[full_id] = json.load(f)["median"]["point_estimate"] / 1e9
    for path in glob.glob(os.path.join(TARGET, "criterion", "notes", "*")):
        with open(path) as f:
            out["note/" + os.path.basename(path)] = int(f.read())
    return out


def timed_process(cmd, env=None):
    """Wall seconds and peak RSS (bytes) of one process, from wait4."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{cmd} failed with status {status}")
    return wall, usage.ru_maxrss * 1024, out.decode()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def machine(python):
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    rustc = subprocess.run(["rustc", "-V"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "rustc": rustc,
        "python": subprocess.run([python, "-V"], capture_output=True, text=True).stdout.strip(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--python", default=sys.executable, help="the Python with torch and peft")
    ap.add_argument("--rounds", type=int, default=3, help="whole-process merge runs of each tool")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = ap.parse_args()
    py = args.python
    loads = [os.getloadavg()[0]]
    os.makedirs(DATA, exist_ok=True)
    if not os.path.exists(os.path.join(MERGE_DIR, "adapter", "adapter_model.safetensors")):
        run([py, "scripts/bench_peft.py", "gen-merge", MERGE_DIR])
    run(["cargo", "build", "--release", "--bin", "lora"])
    run(["cargo", "bench", "--bench", "lora", "--no-run"])

    ours, theirs = {}, {}
    peft_json = os.path.join(DATA, "peft.json")
    # Case by case, ours then theirs, so both see the same stretch of machine load.
    for case, peft_case in [("forward/", "forward"), ("merge/d4096", "merge"), ("train_step/", "train_step"), ("adapter_io/", "adapter_io")]:
        run(["cargo", "bench", "--bench", "lora", "--", case], env=cargo_env(), stdout=subprocess.DEVNULL)
        run([py, "scripts/bench_peft.py", "micro", "--out", peft_json, "--only", peft_case], env={"BENCH_THREADS": THREADS})
        with open(peft_json) as f:
            theirs.update(json.load(f))
        loads.append(os.getloadavg()[0])
    run(["cargo", "bench", "--bench", "lora", "--", "merge_file/"], env=cargo_env(), stdout=subprocess.DEVNULL)
    ours.update(criterion_results())

    # Whole processes, alternating: `lora merge` and PEFT's merge_and_unload + save_pretrained.
    base = os.path.join(MERGE_DIR, "model.safetensors")
    adapter = os.path.join(MERGE_DIR, "adapter")
    ours_out, peft_out = os.path.join(DATA, "merged-lora.safetensors"), os.path.join(DATA, "merged-peft")
    lora_bin = os.path.join(TARGET, "release", "lora")
    proc = {"ours": [], "theirs": [], "theirs_inproc": []}
    for _ in range(args.rounds):
        wall, rss, _ = timed_process([lora_bin, "merge", "--base", base, "--adapter", adapter, "--out", ours_out, "--quiet"], env={"RAYON_NUM_THREADS": THREADS})
        proc["ours"].append((wall, rss))
        os.remove(ours_out)
        wall, rss, out = timed_process([py, "scripts/bench_peft.py", "merge-process", MERGE_DIR, peft_out], env={"BENCH_THREADS": THREADS})
        proc["theirs"].append((wall, rss))
        proc["theirs_inproc"].append(json.loads(out.strip().splitlines()[-1])["merge_save_s"])
        shutil.rmtree(peft_out)
    loads.append(os.getloadavg()[0])

    info = machine(py)
    info.update(torch=theirs.get("torch"), peft=theirs.get("peft"))
    model_mb = os.path.getsize(base) / 1e6
    write_report(args.out, info, ours, theirs, proc, loads, model_mb)
    with open(os.path.join(DATA, "results.json"), "w") as f:
        json.dump({"machine": info, "ours": ours, "theirs": theirs, "process": proc, "loads": loads}, f, indent=1)
    log(f"wrote {args.out}")


def fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def fmt_r(x):
    return "-" if x is None else f"{x:.2f}x"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def verdict(value, limit, le=True):
    if value is None:
        return "not measured"
    ok = value <= limit if le else value >= limit
    return "met" if ok else "**missed**"


def interleaved_ratio(results, key, base_key, ours):
    """The ratio of two cases from their interleaved runs (see `interleaved` in both benches)."""
    if ours:
        note = lambda k: results.get("note/" + k.replace("/", "_", 1).replace("/", "_") + "_ns")
        return ratio(note(key), note(base_key))
    return ratio(results.get(key + "/interleaved"), results.get(base_key + "/interleaved"))


def write_report(path, info, ours, theirs, proc, loads, model_mb):
    o, t = ours.get, theirs.get
    rows = []

    def row(case, ours_s, ours_base, theirs_s, theirs_base, goal="", keys=None):
        ro, rt = ratio(ours_s, ours_base), ratio(theirs_s, theirs_base)
        if keys:
            # Prefer the interleaved runs for ratios between cases of one side.
            ro = interleaved_ratio(ours, *keys, True) or ro
            rt = interleaved_ratio(theirs, *keys, False) or rt
        rows.append(
            f"| {case} | {fmt_t(ours_s)} | {fmt_r(ro)} | {fmt_t(theirs_s)} | "
            f"{fmt_r(rt)} | {fmt_r(ratio(ours_s, theirs_s))} | {goal} |"
        )

    goals = []
    for d, goal in [("d768", 1.05), ("d4096", 1.02)]:
        k = f"forward/{d}/"
        ob, tb = o(k + "base"), t(k + "base")
        row(f"forward {d}: base linear", ob, ob, tb, tb)
        r = interleaved_ratio(ours, k + "unmerged", k + "base", True) or ratio(o(k + "unmerged"), ob)
        row(f"forward {d}: unmerged LoRA", o(k + "unmerged"), ob, t(k + "unmerged"), tb, f"ours/base <= {goal}x: {verdict(r, goal)}", (k + "unmerged", k + "base"))
        goals.append((f"1. unmerged forward {d} over base <= {goal}x", r, verdict(r, goal)))
        r = interleaved_ratio(ours, k + "merged", k + "base", True) or ratio(o(k + "merged"), ob)
        row(f"forward {d}: merged LoRA", o(k + "merged"), ob, t(k + "merged"), tb, f"ours/base <= 1.01x: {verdict(r, 1.01)}", (k + "merged", k + "base"))
        goals.append((f"2. merged forward {d} over base <= 1.01x", r, verdict(r, 1.01)))
    k = "merge/d4096/"
    orp, trp = o(k + "rank_product"), t(k + "rank_product")
    row("`[4096, 8] x [8, 4096]` product", orp, orp, trp, trp)
    r = interleaved_ratio(ours, k + "merge", k + "rank_product", True) or ratio(o(k + "merge"), orp)
    row("merge() of a 4096 x 4096 layer (base = the product)", o(k + "merge"), orp, t(k + "merge"), trp, f"ours/product <= 2x: {verdict(r, 2.0)}", (k + "merge", k + "rank_product"))
    goals.append(("3. merge() over one rank-r product <= 2x", r, verdict(r, 2.0)))
    k = "train_step/gpt4_d768/"
    of, tf = o(k + "full"), t(k + "full")
    row("train step, full fine-tuning", of, of, tf, tf)
    r = ratio(o(k + "lora"), t(k + "lora"))
    row("train step, LoRA q/v (base = full fine-tuning)", o(k + "lora"), of, t(k + "lora"), tf, f"ours/PEFT <= 1.0x: {verdict(r, 1.0)}")
    goals.append(("4a. LoRA train step vs PyTorch + PEFT <= 1.0x", r, verdict(r, 1.0)))
    r = ratio(o(k + "lora"), of)
    goals.append(("4b. LoRA train step vs our full fine-tuning < 1.0x", r, verdict(r, 0.9999)))
    so, sf = o("note/train_step_lora_optimizer_state_bytes"), o("note/train_step_full_optimizer_state_bytes")
    r = ratio(sf, so)
    goals.append(("4c. optimizer state, full / LoRA >= 100x", r, verdict(r, 100.0, le=False)))
    k = "adapter_io/l32_d4096/"
    row("save_adapter (32 layers, d = 4096, q/v, r = 8)", o(k + "save"), None, t(k + "save"), None, "vs PEFT `save_pretrained`")
    row("load_adapter (same)", o(k + "load"), None, t(k + "load"), None, "vs PEFT `load_adapter`")
    goals.append(("5. save_adapter vs PEFT", ratio(o(k + "save"), t(k + "save")), "reported"))
    goals.append(("5. load_adapter vs PEFT", ratio(o(k + "load"), t(k + "load")), "reported"))

    ow = median([w for w, _ in proc["ours"]])
    tw = median([w for w, _ in proc["theirs"]])
    orss = max(r for _, r in proc["ours"])
    trss = max(r for _, r in proc["theirs"])
    tin = median(proc["theirs_inproc"])
    floor = o("merge_file/model/io_floor")
    oin = o("merge_file/model/merge")
    row(f"I/O floor: read {model_mb:.0f} MB, write + sync it", floor, floor, None, None)
    r = ratio(oin, floor)
    row("`lora merge` in-process vs PEFT merge_and_unload + save_pretrained (base = I/O floor)", oin, floor, tin, floor, f"ours/floor <= 2x: {verdict(r, 2.0)}")
    goals.append(("6a. `lora merge` in-process over the I/O floor <= 2x", r, verdict(r, 2.0)))
    r = ratio(oin, tin)
    goals.append(("6b. in-process merge-and-save vs PEFT <= 0.5x", r, verdict(r, 0.5)))
    r = ratio(ow, tw)
    row("whole process: `lora merge` vs python (load, merge_and_unload, save)", ow, None, tw, None, f"ours/PEFT <= 0.1x: {verdict(r, 0.1)}")
    goals.append(("6c. whole process time vs PEFT <= 0.1x", r, verdict(r, 0.1)))
    r = ratio(orss, trss)
    rows.append(
        f"| whole process: peak RSS | {orss / 2**20:.0f} MiB | - | {trss / 2**20:.0f} MiB | - | {fmt_r(r)} | ours/PEFT <= 0.1x: {verdict(r, 0.1)} |"
    )
    goals.append(("6d. whole process peak RSS vs PEFT <= 0.1x", r, verdict(r, 0.1)))
    if so and sf:
        rows.append(
            f"| AdamW state: LoRA / full fine-tuning | {so / 1e6:.2f} MB / {sf / 1e6:.0f} MB | 1/{sf / so:.0f} | "
            f"{t('train_step/gpt4_d768/lora_optimizer_state_bytes', 0) / 1e6:.2f} MB / {t('train_step/gpt4_d768/full_optimizer_state_bytes', 0) / 1e6:.0f} MB | "
            f"1/{ratio(t('train_step/gpt4_d768/full_optimizer_state_bytes'), t('train_step/gpt4_d768/lora_optimizer_state_bytes')) or 0:.0f} | - | full / LoRA >= 100x: {verdict(ratio(sf, so), 100.0, le=False)} |"
        )

    lines = [
        BEGIN,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} by `scripts/bench.sh` on: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory_gib']} GiB, Linux {info['kernel']}; {info['rustc']}; {info['python']}, torch {info['torch']}, "
        f"peft {info['peft']}. CPU, f32, {THREADS} threads on both sides. Load average (1 min) during the run: "
        + ", ".join(f"{x:.1f}" for x in loads)
        + " (the machine is shared: absolute times are noisy, the ratios less so).",
        "",
        "Times are medians (criterion on our side, per-call medians in `scripts/bench_peft.py` on PEFT's). "
        "\"/ base\" is each side against its own baseline, named in the row; for the forward and merge rows it comes from "
        "a separate interleaved run (base, LoRA, merged called in turn, medians of each), so that load bursts hit both alike. "
        "\"ours / PEFT\" compares the two directly (separate runs, minutes apart: the noisiest column).",
        "",
        "| case | ours | ours / base | PyTorch + PEFT | PEFT / base | ours / PEFT | goal |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *[f"| {g} | {fmt_r(v)} | {verdict_text} |" for g, v, verdict_text in goals],
        "",
        f"Whole-process runs ({len(proc['ours'])} each, alternating): `lora merge` "
        + ", ".join(f"{w:.2f} s / {r / 2**20:.0f} MiB" for w, r in proc["ours"])
        + "; PEFT "
        + ", ".join(f"{w:.1f} s / {r / 2**20:.0f} MiB" for w, r in proc["theirs"])
        + "; PEFT in-process merge_and_unload + save_pretrained "
        + ", ".join(f"{s:.2f} s" for s in proc["theirs_inproc"])
        + ".",
        "",
        END,
    ]
    text = "\n".join(lines)
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + text + old[old.index(END) + len(END) :]
    else:
        text = old.rstrip() + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
