#!/usr/bin/env python3
"""GGUF quantization and adapter fixtures, from the `gguf` Python package (gguf-py, llama.cpp's
own reader and writer). Writes tests/fixtures/gguf/:

    quant.gguf          (GGUFWriter) a small `llama` GGUF (4 heads, 2 KV heads, head dim 64):
        x                   f32 [4, 512], seeded normal values
        x.<t>               x quantized by gguf-py, t in q4_0 q4_1 q5_0 q5_1 q8_0
        random.<t>          [2, 512] random K-quant blocks (random bytes, finite f16 scales),
                            t in q2_k q3_k q4_k q5_k q6_k: gguf-py cannot quantize K-quants, so
                            these check that candle reads K-quant bytes as gguf-py does, and
                            therefore that what candle writes reads the same in llama.cpp's tools
        blk.0.attn_q.weight [256, 256] random Q4_K blocks; blk.0.attn_k.weight [128, 256] random
                            Q6_K blocks (rows as llama.cpp stores them: permuted)
    adapter/            PEFT-format LoRA (r 4, alpha 8) on model.layers.0.self_attn.{q,k}_proj,
                        random A and B, B rows in transformers' order
    expected.safetensors
        deq.<name>          gguf-py's dequantization of x.<t> and random.<t>
        merged.<name>       blk.0.attn_{q,k}.weight: dequantized + llama.cpp's row permutation
                            (convert_hf_to_gguf.py's LlamaModel.permute) of (alpha/r) B A
        export.<name>.lora_{a,b}  what convert_lora_to_gguf.py writes for adapter/ (B permuted)
        patterns.<name>.delta     for adapter-patterns/: the delta PEFT applies (its own scaling
                            per module), rows permuted: llama.cpp's alpha / r * lora_b @ lora_a
                            of an export must equal it
    adapter-patterns/   the same modules with use_rslora, rank_pattern {"k_proj": 2} and
                        alpha_pattern {"q_proj": 32} (r 4, alpha 8): scalings 16 and 8/sqrt(2)

    python scripts/gguf_fixtures.py                 # regenerate the fixtures
    python scripts/gguf_fixtures.py --check-merged merged.gguf base.gguf adapter_dir
        dequantizes every tensor of a `lora merge` output with gguf-py and checks the untouched
        ones are byte for byte the base's (what was run is in the README)
    python scripts/gguf_fixtures.py --check-export adapter.gguf ADAPTER_DIR BASE.gguf
        reads a `lora export --format gguf` file with gguf-py, prints its metadata and tensors and
        checks that llama.cpp's scaling (alpha / rank of lora_b) of every pair gives PEFT's delta

    python scripts/gguf_fixtures.py --check-transformers merged.gguf
        loads a `lora merge` of tests/fixtures/llm/smollm2-adapter into SmolLM2's GGUF with
        transformers (`gguf_file=`) and compares its last-position logits with PEFT's unmerged
        base + adapter (tests/fixtures/llm/smollm2-adapter/reference.json)

Versions: gguf 0.19.0, numpy 2.4.6 (transformers 5.24 / torch 2.15 for the optional checks).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize, dequantize

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests/fixtures/gguf"

LEGACY = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "q8_0": Q.Q8_0}
# (type, bytes per 256-value block, byte offsets of its f16 scales)
KQUANTS = {
    "q2_k": (Q.Q2_K, 84, [80, 82]),
    "q3_k": (Q.Q3_K, 110, [108]),
    "q4_k": (Q.Q4_K, 144, [0, 2]),
    "q5_k": (Q.Q5_K, 176, [0, 2]),
    "q6_k": (Q.Q6_K, 210, [208]),
}


def random_kquant(rng, name, rows, cols):
    """Random bytes for `rows` rows of `cols` values of a K-quant, with sane f16 scales."""
    qtype, size, scales = KQUANTS[name]
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for off in scales:
        d = rng.uniform(0.001, 0.01, size=blocks).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // 256 * size), qtype


def permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def peft_scaling(cfg, module):
    """PEFT's scaling of `module`: alpha_pattern / rank_pattern keys match a path suffix."""
    import re

    def pick(pattern, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?{key}$", module):
                return value
        return default

    r = pick(cfg.get("rank_pattern"), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def write():
    from safetensors.numpy import save_file
    rng = np.random.default_rng(15)
    OUT.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(OUT / "quant.gguf"), "llama")
    w.add_name("gguf-fixture")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(512)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-5)
    expected = {}
    x = rng.normal(0, 0.05, size=(4, 512)).astype(np.float32)
    w.add_tensor("x", x)
    for name, qtype in LEGACY.items():
        q = quantize(x, qtype)
        w.add_tensor(f"x.{name}", q, raw_dtype=qtype)
        expected[f"deq.x.{name}"] = dequantize(q, qtype).astype(np.float32)
    for name in KQUANTS:
        raw, qtype = random_kquant(rng, name, 2, 512)
        w.add_tensor(f"random.{name}", raw, raw_dtype=qtype)
        expected[f"deq.random.{name}"] = dequantize(raw, qtype).astype(np.float32)
    # The adapted tensors and the adapter.
    r, alpha, heads, kv_heads = 4, 8, 4, 2
    tensors = {}
    adapter = {}
    for proj, gname, rows, qname, h in [("q_proj", "attn_q", 256, "q4_k", heads),
                                        ("k_proj", "attn_k", 128, "q6_k", kv_heads)]:
        raw, qtype = random_kquant(rng, qname, rows, 256)
        full = f"blk.0.{gname}.weight"
        w.add_tensor(full, raw, raw_dtype=qtype)
        deq = dequantize(raw, qtype).astype(np.float32)
        a = rng.normal(0, 0.1, size=(r, 256)).astype(np.float32)
        b = rng.normal(0, 0.05, size=(rows, r)).astype(np.float32)
        key = f"base_model.model.model.layers.0.self_attn.{proj}"
        adapter[f"{key}.lora_A.weight"] = a
        adapter[f"{key}.lora_B.weight"] = b
        delta = (alpha / r) * (b.astype(np.float64) @ a.astype(np.float64))
        expected[f"merged.{full}"] = (deq + permute(delta, h)).astype(np.float32)
        # convert_lora_to_gguf.py: A as is, B permuted (LoraTorchTensor.permute acts on B).
        expected[f"export.{full}.lora_a"] = a
        expected[f"export.{full}.lora_b"] = permute(b, h)
    # rsLoRA with rank and alpha patterns on the same modules.
    pcfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
            "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"q_proj": 32},
            "target_modules": ["k_proj", "q_proj"], "fan_in_fan_out": False, "use_dora": False}
    patterns = {}
    for proj, gname, rows, h in [("q_proj", "attn_q", 256, heads), ("k_proj", "attn_k", 128, kv_heads)]:
        module = f"model.layers.0.self_attn.{proj}"
        rank = 2 if proj == "k_proj" else 4
        a = rng.normal(0, 0.1, size=(rank, 256)).astype(np.float32)
        b = rng.normal(0, 0.05, size=(rows, rank)).astype(np.float32)
        patterns[f"base_model.model.{module}.lora_A.weight"] = a
        patterns[f"base_model.model.{module}.lora_B.weight"] = b
        delta = peft_scaling(pcfg, module) * (b.astype(np.float64) @ a.astype(np.float64))
        expected[f"patterns.blk.0.{gname}.weight.delta"] = permute(delta, h).astype(np.float32)
    (OUT / "adapter-patterns").mkdir(exist_ok=True)
    save_file(patterns, str(OUT / "adapter-patterns/adapter_model.safetensors"))
    (OUT / "adapter-patterns/adapter_config.json").write_text(json.dumps(pcfg, indent=2) + "\n")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, str(OUT / "expected.safetensors"))
    (OUT / "adapter").mkdir(exist_ok=True)
    save_file(adapter, str(OUT / "adapter/adapter_model.safetensors"))
    (OUT / "adapter/adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha,
        "target_modules": ["k_proj", "q_proj"], "fan_in_fan_out": False,
        "use_dora": False, "use_rslora": False,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")


def check_merged(merged, base, adapter):
    """Reads a `lora merge` output with gguf-py: every tensor dequantizes, the metadata and the
    tensors the adapter does not touch equal the base's."""
    m, b = gguf.GGUFReader(merged), gguf.GGUFReader(base)
    bt = {t.name: t for t in b.tensors}
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    mk = {f.name: (f.types, [bytes(p) for p in f.parts]) for f in m.fields.values()}
    bk = {f.name: (f.types, [bytes(p) for p in f.parts]) for f in b.fields.values()}
    assert mk.keys() == bk.keys(), set(mk) ^ set(bk)
    same_meta = sum(mk[k] == bk[k] for k in mk if not k.startswith("GGUF."))
    changed, copied = 0, 0
    for t in m.tensors:
        values = dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name
        src = bt[t.name]
        if t.tensor_type == src.tensor_type and np.array_equal(np.asarray(t.data), np.asarray(src.data)):
            copied += 1
        else:
            changed += 1
            rel = np.abs(values - dequantize(src.data, src.tensor_type)).max() / np.abs(values).max()
            print(f"  {t.name}: {src.tensor_type.name} -> {t.tensor_type.name}, max |merged - base| / max |merged| {rel:.3e}")
    print(f"{merged}: {len(m.tensors)} tensors ({changed} changed, {copied} byte for byte), "
          f"{same_meta}/{len([k for k in mk if not k.startswith('GGUF.')])} metadata keys equal; "
          f"adapter targets {cfg.get('target_modules')}")


def check_export(path, adapter, base):
    """Reads an exported adapter with gguf-py and checks llama.cpp's scaling of each pair against
    PEFT's own scaling of the adapter (rows permuted for attn_q / attn_k as in the base)."""
    from safetensors.numpy import load_file
    r = gguf.GGUFReader(path)
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        meta[f.name] = f.contents()
        print(f"  {f.name} = {meta[f.name]}")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora", meta
    alpha = float(meta["adapter.lora.alpha"])
    t = {x.name: dequantize(x.data, x.tensor_type).astype(np.float64) for x in r.tensors}
    for x in r.tensors:
        print(f"  {x.name} {x.tensor_type.name} {[int(d) for d in x.shape][::-1]}")
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    factors = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    b = gguf.GGUFReader(base)
    arch = bytes(b.fields["general.architecture"].parts[-1]).decode()
    heads = int(b.fields[f"{arch}.attention.head_count"].parts[-1][0])
    kv = int(b.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    worst = 0.0
    for key in factors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        layer, sub = module.removeprefix("model.layers.").split(".", 1)
        gname = f"blk.{layer}.{names[sub]}.weight"
        want = peft_scaling(cfg, module) * (
            factors[key.replace("lora_A", "lora_B")].astype(np.float64) @ factors[key].astype(np.float64))
        if arch == "llama" and names[sub] in ("attn_q", "attn_k"):
            want = permute(want, heads if names[sub] == "attn_q" else kv)
        lb, la = t[f"{gname}.lora_b"], t[f"{gname}.lora_a"]
        got = alpha / lb.shape[1] * (lb @ la)
        rel = np.abs(got - want).max() / np.abs(want).max()
        worst = max(worst, rel)
    print(f"{path}: {len(t) // 2} pairs, alpha {alpha}; max |llama.cpp delta - PEFT delta| / max |PEFT delta| = {worst:.3e}")
    assert worst < 1e-5 or any(x.tensor_type != Q.F32 for x in r.tensors), worst


def check_transformers(merged):
    import torch
    from transformers import AutoModelForCausalLM
    ref = json.loads((ROOT / "tests/fixtures/llm/smollm2-adapter/reference.json").read_text())
    path = Path(merged).resolve()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ref["prompt_ids"]])).logits[0, -1]
    want = ref["adapter_last_topk"]
    diff = max(abs(float(logits[i]) - v) for i, v in want)
    top = int(torch.argmax(logits))
    print(f"{merged}: transformers loads it; top-20 logits of PEFT's base + adapter: max |diff| "
          f"{diff:.3e} (largest {want[0][1]:.2f}); argmax {top} (PEFT {want[0][0]})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-merged", nargs=3, metavar=("MERGED", "BASE", "ADAPTER"))
    ap.add_argument("--check-transformers", metavar="MERGED")
    ap.add_argument("--check-export", nargs=3, metavar=("ADAPTER_GGUF", "ADAPTER", "BASE"))
    args = ap.parse_args()
    if args.check_merged:
        check_merged(*args.check_merged)
    elif args.check_transformers:
        check_transformers(args.check_transformers)
    elif args.check_export:
        check_export(*args.check_export)
    else:
        write()
