#!/usr/bin/env python3
"""PEFT interoperability fixtures for tests/peft_interop.rs, and the reverse check.

Builds small PyTorch models whose module trees mirror the Rust test models, attaches real PEFT
LoRA adapters with non-zero B, and writes for each case a folder tests/fixtures/peft/<case>/:

    base.safetensors     the base model's state_dict (PyTorch names)
    adapter/             PEFT `save_pretrained` output (adapter_model.safetensors, adapter_config.json)
    merged.safetensors   the state_dict after PEFT's `merge_and_unload`
    io.safetensors       `input`, PEFT's `unmerged_output` and `merged_output`

(`sharded` has base/ and merged/ directories with shards and model.safetensors.index.json
instead of the two files; `half` has a bf16 base and no io.safetensors.)

Setup (CPU only; CI does not run this, it only reads the committed fixtures):

    python3 -m venv /tmp/peftvenv
    /tmp/peftvenv/bin/pip install -r scripts/requirements.txt

Regenerate the fixtures (from the repository root):

    /tmp/peftvenv/bin/python scripts/peft_fixtures.py

Reverse direction: check that an adapter saved by the Rust side loads in PEFT with no missing or
unexpected LoRA keys and gives the output the Rust side computed (DIR/io.safetensors holds
`input` and `output`):

    PEFT_INTEROP_OUT=target/rust_adapter cargo test --test peft_interop -- --ignored write_rust_adapters
    /tmp/peftvenv/bin/python scripts/peft_fixtures.py --check-rust-adapter target/rust_adapter/llama_qv llama_qv
    /tmp/peftvenv/bin/python scripts/peft_fixtures.py --check-rust-adapter target/rust_adapter/gpt2_conv1d gpt2_conv1d
    /tmp/peftvenv/bin/python scripts/peft_fixtures.py --check-rust-adapter target/rust_adapter/dora_llama dora_llama
    (likewise for rslora, biased, dora_gpt2, embedding, conv1d, conv2d)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy
import peft
import safetensors
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "peft"
META = {"format": "pt"}

# Model sizes: small enough that all fixtures together stay far below 2 MB, and every projection
# non-square so a transposed weight or factor cannot go unnoticed.
HIDDEN = 16  # residual stream
INNER = 24  # q/k/v output, o_proj input
MLP = 40  # gate/up output, down input
INPUT_SHAPE = (2, 3, HIDDEN)  # batch, sequence, hidden: exercises 3-d inputs

# Forward outputs are compared with max|ours - ref| <= OUTPUT_RTOL * max|ref| (same as the Rust test).
OUTPUT_RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Models. The forward passes are mirrored exactly in tests/peft_interop.rs.


class Attention(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, INNER, bias=bias)
        self.k_proj = nn.Linear(HIDDEN, INNER, bias=bias)
        self.v_proj = nn.Linear(HIDDEN, INNER, bias=bias)
        self.o_proj = nn.Linear(INNER, HIDDEN, bias=bias)

    def forward(self, h):
        return self.o_proj(self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h))


class Mlp(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, MLP, bias=bias)
        self.up_proj = nn.Linear(HIDDEN, MLP, bias=bias)
        self.down_proj = nn.Linear(MLP, HIDDEN, bias=bias)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Layer(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.self_attn = Attention(bias)
        self.mlp = Mlp(bias)

    def forward(self, h):
        h = h + self.self_attn(h)
        return h + self.mlp(h)


class Norm(nn.Module):
    """A parameter that is not part of the forward: checks that the CLI copies untouched tensors."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(HIDDEN))


class Inner(nn.Module):
    def __init__(self, bias: bool, extra: bool):
        super().__init__()
        self.layers = nn.ModuleList([Layer(bias) for _ in range(2)])
        if extra:
            self.norm = Norm()


class LlamaLike(nn.Module):
    """model.layers.{0,1}.self_attn.{q,k,v,o}_proj, model.layers.{0,1}.mlp.{gate,up,down}_proj."""

    def __init__(self, bias: bool = False, extra: bool = False):
        super().__init__()
        self.model = Inner(bias, extra)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


class GptAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(3 * INNER, HIDDEN)  # weight [HIDDEN, 3 * INNER]
        self.c_proj = Conv1D(HIDDEN, INNER)  # weight [INNER, HIDDEN]

    def forward(self, h):
        q, k, v = self.c_attn(h).split(INNER, dim=-1)
        return self.c_proj(q * torch.sigmoid(k) + v)


class GptMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(MLP, HIDDEN)  # weight [HIDDEN, MLP]
        self.c_proj = Conv1D(HIDDEN, MLP)  # weight [MLP, HIDDEN]

    def forward(self, h):
        return self.c_proj(F.silu(self.c_fc(h)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = GptAttention()
        self.mlp = GptMlp()

    def forward(self, h):
        h = h + self.attn(h)
        return h + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([Block() for _ in range(2)])


class Gpt2Like(nn.Module):
    """transformer.h.{0,1}.attn.{c_attn,c_proj}, transformer.h.{0,1}.mlp.{c_fc,c_proj}: Conv1D."""

    def __init__(self):
        super().__init__()
        self.transformer = Transformer()
        # Conv1D's default init (std 0.02, zero bias) would make the adapter dominate and hide a
        # wrong bias: give weights and biases magnitudes like nn.Linear's.
        for module in self.modules():
            if isinstance(module, Conv1D):
                fan_in = module.weight.shape[0]
                nn.init.uniform_(module.weight, -(fan_in**-0.5), fan_in**-0.5)
                nn.init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)

    def forward(self, x):
        for block in self.transformer.h:
            x = block(x)
        return x


VOCAB = 20  # embedding rows


class EmbedInner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.proj = nn.Linear(HIDDEN, INNER)


class EmbedLm(nn.Module):
    """model.embed_tokens (nn.Embedding) and model.proj (nn.Linear): embedding and linear LoRA in one adapter."""

    def __init__(self):
        super().__init__()
        self.model = EmbedInner()

    def forward(self, ids):
        return self.model.proj(self.model.embed_tokens(ids))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(6, 10, 3, padding=1)
        self.conv2 = nn.Conv1d(10, 4, 5, stride=2, padding=2)


class Conv1dNet(nn.Module):
    """encoder.conv1 (k=3, padding 1), encoder.conv2 (k=5, stride 2, padding 2): nn.Conv1d."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, x):
        return self.encoder.conv2(F.silu(self.encoder.conv1(x)))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(8, 6, (3, 2), padding=1)  # a non-square kernel
        self.head = nn.Conv2d(6, 5, 1)  # 1x1: PEFT's other get_delta_weight branch


class Conv2dNet(nn.Module):
    """backbone.stem (3x3, stride 2), backbone.mix (3x2), backbone.head (1x1): nn.Conv2d."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()

    def forward(self, x):
        b = self.backbone
        return b.head(F.silu(b.mix(F.silu(b.stem(x)))))


# ---------------------------------------------------------------------------------------------
# Cases: (seed, model constructor, dtype, LoraConfig kwargs; `input`: the input from a generator
# when it is not INPUT_SHAPE normal; `grads`: also store PEFT's gradients of every trainable
# parameter, A, B and DoRA's magnitude).

CASES = {
    "llama_qv": dict(
        seed=1,
        model=lambda: LlamaLike(),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
    ),
    "rslora": dict(
        seed=2,
        model=lambda: LlamaLike(),
        lora=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    "patterns": dict(
        seed=3,
        model=lambda: LlamaLike(),
        lora=dict(
            r=4,
            lora_alpha=8,
            # One regex string: must match the whole module path.
            target_modules=r".*\.(q_proj|v_proj|up_proj)",
            # Keys in sorted order (PEFT saves with sorted keys and takes the first match).
            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "up_proj": 6},
            alpha_pattern={"model.layers.0.mlp.up_proj": 12, "v_proj": 5.5},
        ),
    ),
    "biased": dict(
        seed=4,
        model=lambda: LlamaLike(bias=True),
        lora=dict(
            r=3,
            lora_alpha=7,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    ),
    "gpt2_conv1d": dict(
        seed=5,
        model=lambda: Gpt2Like(),
        lora=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    ),
    "sharded": dict(
        seed=6,
        model=lambda: LlamaLike(extra=True),
        lora=dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        # shard file -> module prefixes stored in it (the rest goes to the last shard)
        shards=[
            ("model-00001-of-00003.safetensors", "model.layers.0."),
            ("model-00002-of-00003.safetensors", "model.layers.1."),
            ("model-00003-of-00003.safetensors", ""),
        ],
    ),
    # DoRA (use_dora): PEFT's magnitudes start at the row norms of W + s B A; they are perturbed
    # afterwards (as training would) so that the magnitude matters. io.safetensors also holds
    # PEFT's gradients of a fixed loss with respect to every A, B and magnitude.
    "dora_llama": dict(
        seed=8,
        model=lambda: LlamaLike(bias=True),
        lora=dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            lora_dropout=0.05,
        ),
        grads=True,
    ),
    "dora_gpt2": dict(
        seed=9,
        model=lambda: Gpt2Like(),
        lora=dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        grads=True,
    ),
    # Embedding and convolution LoRA; io.safetensors also holds PEFT's factor gradients.
    "embedding": dict(
        seed=8,
        model=lambda: EmbedLm(),
        lora=dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "proj"]),
        input=lambda gen: torch.randint(0, VOCAB, (2, 3), generator=gen),
        grads=True,
    ),
    "conv1d": dict(
        seed=9,
        model=lambda: Conv1dNet(),
        lora=dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2"]),
        input=lambda gen: torch.randn((2, 6, 11), generator=gen),
        grads=True,
    ),
    "conv2d": dict(
        seed=10,
        model=lambda: Conv2dNet(),
        lora=dict(r=3, lora_alpha=6, target_modules=["stem", "mix", "head"]),
        input=lambda gen: torch.randn((2, 3, 9, 9), generator=gen),
        grads=True,
    ),
    "half": dict(
        seed=7,
        model=lambda: LlamaLike(),
        dtype=torch.bfloat16,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
}


def build_model(case: str) -> nn.Module:
    spec = CASES[case]
    torch.manual_seed(spec["seed"])
    model = spec["model"]()
    return model.to(spec.get("dtype", torch.float32)).eval()


def make_input(case: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + CASES[case]["seed"])
    if "input" in CASES[case]:
        return CASES[case]["input"](gen)
    return torch.randn(INPUT_SHAPE, generator=gen)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_sharded(tensors: dict[str, torch.Tensor], shards, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name in sorted(tensors):
        weight_map[name] = next(f for f, prefix in shards if name.startswith(prefix))
    for file, _ in shards:
        part = {k: v for k, v in tensors.items() if weight_map[k] == file}
        save_file(part, out / file, metadata=META)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def generate(case: str, root: Path) -> None:
    spec = CASES[case]
    out = root / case
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    model = build_model(case)
    base = state_dict(model)
    x = make_input(case)

    torch.manual_seed(100 + spec["seed"])  # the adapter's A and B
    # init_lora_weights=False: B random (not zero), so the adapter changes the output.
    config = LoraConfig(init_lora_weights=False, **spec["lora"])
    peft_model = get_peft_model(model, config).eval()
    if spec.get("dtype", torch.float32) != torch.float32:
        # PEFT creates the factors in the base dtype and then upcasts them to f32
        # (autocast_adapter_dtype), so they would hold bf16-representable values. A trained
        # adapter does not: give A and B full f32 values, as training in f32 would.
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    assert param.dtype == torch.float32, f"{name} is {param.dtype}"
                    bound = param.shape[1] ** -0.5
                    param.copy_(torch.empty_like(param).uniform_(-bound, bound))

    if spec["lora"].get("use_dora"):
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_magnitude_vector." in name:
                    param.mul_(1.0 + 0.3 * torch.randn_like(param))
    grads = factor_grads(peft_model, x, spec["seed"]) if spec.get("grads") else {}

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        (out / "adapter").mkdir()
        shutil.copy(Path(tmp) / "adapter_model.safetensors", out / "adapter" / "adapter_model.safetensors")
        # PEFT writes target_modules from a set: its order depends on PYTHONHASHSEED. Sort it so
        # regenerating gives the same bytes (still sorted keys, indent 2, as PEFT writes).
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    half = spec.get("dtype", torch.float32) != torch.float32
    with torch.no_grad():
        unmerged_output = None if half else peft_model(x)
        merged_model = peft_model.merge_and_unload()
        merged_output = None if half else merged_model(x)
    merged = state_dict(merged_model)
    assert merged.keys() == base.keys(), "merge_and_unload changed the parameter names"

    if "shards" in spec:
        save_sharded(base, spec["shards"], out / "base")
        save_sharded(merged, spec["shards"], out / "merged")
    else:
        save_file(base, out / "base.safetensors", metadata=META)
        save_file(merged, out / "merged.safetensors", metadata=META)
    if not half:
        rel = ((unmerged_output - merged_output).abs().max() / merged_output.abs().max()).item()
        assert rel < OUTPUT_RTOL, f"{case}: PEFT's own merged and unmerged outputs differ by {rel}"
        io = {"input": x, "unmerged_output": unmerged_output, "merged_output": merged_output, **grads}
        save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors", metadata=META)
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    print(f"{case}: {len(base)} tensors, {len(changed)} merged")


def file_key(param_name: str) -> str:
    """PEFT's parameter name -> the adapter file's key (no adapter name; no `.weight` on DoRA's
    magnitude, as PEFT 0.21 saves it; embedding factors end in the adapter name)."""
    key = param_name.replace(".default.", ".").removesuffix(".default")
    if key.endswith(".lora_magnitude_vector.weight"):
        key = key[: -len(".weight")]
    return key


def factor_grads(peft_model: nn.Module, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """`grad_output` (a fixed cotangent of the output's shape) and `grad.<file key>` =
    d(sum(output * grad_output))/d param for every trainable parameter (A, B and DoRA's
    magnitude), in eval mode (no dropout), as PEFT computes them: the weight norm of DoRA
    detached."""
    with torch.no_grad():
        shape = peft_model(x).shape
    grad_output = torch.randn(shape, generator=torch.Generator().manual_seed(2000 + seed))
    peft_model.zero_grad()
    (peft_model(x) * grad_output).sum().backward()
    out = {"grad_output": grad_output}
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            out[f"grad.{file_key(name)}"] = param.grad.detach().clone().contiguous()
    peft_model.zero_grad()
    return out


def write_versions(root: Path) -> None:
    text = (
        f"python {platform.python_version()}\n"
        f"torch {torch.__version__}\n"
        f"peft {peft.__version__}\n"
        f"transformers {transformers.__version__}\n"
        f"safetensors {safetensors.__version__}\n"
        f"numpy {numpy.__version__}\n"
    )
    (root / "VERSIONS.txt").write_text(text)


# ---------------------------------------------------------------------------------------------
# Reverse direction: an adapter saved by the Rust side, loaded by PEFT.


def check_rust_adapter(adapter_dir: Path, case: str, fixtures: Path) -> None:
    spec = CASES[case]
    model = build_model(case)
    base_path = fixtures / case / "base.safetensors"
    if "shards" in spec:
        base = {}
        for f in sorted((fixtures / case / "base").glob("*.safetensors")):
            base.update(load_file(f))
    else:
        base = load_file(base_path)
    model.load_state_dict(base, strict=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    for w in caught:
        print(f"  warning from PEFT: {w.message}")
    missing_warnings = [w for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing_warnings, f"PEFT reports missing adapter keys: {missing_warnings[0].message}"

    # Load the file a second time by hand to see PEFT's incompatible keys directly.
    file_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, file_tensors)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not unexpected, f"unexpected keys: {unexpected}"
    assert not missing, f"missing LoRA keys: {missing}"

    # Every LoRA parameter PEFT created holds the value from the file, and vice versa.
    expected_keys = set(peft.get_peft_model_state_dict(peft_model).keys())
    assert expected_keys == set(file_tensors), (
        f"key sets differ: only in PEFT {sorted(expected_keys - set(file_tensors))}, "
        f"only in file {sorted(set(file_tensors) - expected_keys)}"
    )
    state = peft.get_peft_model_state_dict(peft_model)
    for k, v in file_tensors.items():
        assert torch.equal(state[k], v), f"{k} was not loaded as stored"
    n_layers = sum(1 for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    per_layer = 3 if peft_model.peft_config["default"].use_dora else 2  # A, B (, magnitude)
    assert per_layer * n_layers == len(file_tensors), f"{n_layers} LoRA layers but {len(file_tensors)} tensors"

    io = load_file(adapter_dir / "io.safetensors")
    with torch.no_grad():
        ours = peft_model(io["input"])
        rel = ((ours - io["output"]).abs().max() / io["output"].abs().max()).item()
        merged = peft_model.merge_and_unload()(io["input"])
        rel_merged = ((merged - io["output"]).abs().max() / io["output"].abs().max()).item()
    print(
        f"{case}: PEFT loaded {len(file_tensors)} tensors ({n_layers} LoRA layers) from {adapter_dir}, "
        f"no missing or unexpected keys; rel. output error unmerged {rel:.3e}, merged {rel_merged:.3e}"
    )
    assert rel <= OUTPUT_RTOL and rel_merged <= OUTPUT_RTOL, f"outputs differ (tolerance {OUTPUT_RTOL})"
    print(f"{case}: OK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture root (default: tests/fixtures/peft)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="cases to generate")
    parser.add_argument(
        "--check-rust-adapter",
        nargs=2,
        metavar=("DIR", "CASE"),
        help="load an adapter saved by the Rust side in PEFT and compare with DIR/io.safetensors",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    if args.check_rust_adapter:
        adapter_dir, case = args.check_rust_adapter
        check_rust_adapter(Path(adapter_dir), case, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        generate(case, args.out)
    write_versions(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
