#!/usr/bin/env python3
"""PEFT AdaLoRA fixtures for tests/peft_adalora.rs, and the reverse check.

Uses the Llama-like model of scripts/peft_fixtures.py (biased projections) with real PEFT
AdaLoRA adapters (`AdaLoraConfig`, `SVDLinear`) whose singular values `E` and left factors `B`
are random (PEFT starts `E` at zero), and writes tests/fixtures/peft/adalora/:

    base.safetensors          the base model's state_dict (PyTorch names), shared by the cases
    <case>/adapter/           PEFT `save_pretrained` output (README.md dropped)
    <case>/merged.safetensors the state_dict after PEFT's `merge_and_unload()`
    <case>/io.safetensors     `input`, PEFT's `unmerged_output` and `merged_output`,
                              `grad_output` and PEFT's gradients `grad.<file key>` of
                              sum(output * grad_output) for every lora_A, lora_E, lora_B

Cases (both: targets q_proj, v_proj, down_proj; init_r = 4, lora_alpha = 8, dropout 0.05,
inactive in eval):

    plain    no rank pattern: every module keeps its 4 singular values (ranknum 4)
    pattern  a rank pattern as PEFT's rank allocator leaves it: some singular values masked
             (E set to zero there, `rank_pattern` in the config); PEFT saves the kept rows only
             and, when it loads, rebuilds those modules at the smaller rank with ranknum = init_r.
             The outputs are those of the adapter loaded back by PEFT (`PeftModel.from_pretrained`),
             checked equal to the model before saving. No gradients (PEFT trains the unpruned model).

    alloc    PEFT's rank allocation during training (init_r 4 -> target_r 2, tinit 2, tfinal 3,
             deltaT 2, total_step 12, E started random): 12 AdamW steps of a squared-error loss
             plus PEFT's orthogonal regulariser (`AdaLoraModel.forward`), `update_and_allocate(step)`
             after each step (steps 1..=12). Writes alloc/adapter/ (the adapter before training),
             alloc/steps.safetensors: per step `<step>.<param key>.param` (what the allocator saw:
             after the optimizer step), `.grad` (its gradient) and `<step>.<E key>.after` (E after
             `update_and_allocate`), `<step>.loss` (PEFT's loss with the regulariser) and
             `<step>.lm_loss` (without), both on the parameters before that step; and
             alloc/expected.json: the rank pattern after each step and PEFT's `budget_schedule` for
             the alloc config and a larger one.

Regenerate (from the repository root):

    /tmp/llmvenv/bin/python scripts/peft_adalora_fixtures.py [--case alloc]
    cargo test --test peft_adalora

Reverse direction: an adapter saved by the Rust side (DIR with adapter_model.safetensors,
adapter_config.json and io.safetensors holding `input` and the Rust `output`) loads in PEFT
with no missing or unexpected keys and gives the same unmerged and merged outputs:

    PEFT_ADALORA_OUT=target/rust_adalora cargo test --test peft_adalora -- --ignored write_rust_adalora_adapters
    /tmp/llmvenv/bin/python scripts/peft_adalora_fixtures.py --check-rust-adapter target/rust_adalora/fresh
    /tmp/llmvenv/bin/python scripts/peft_adalora_fixtures.py --check-rust-adapter target/rust_adalora/pattern
    /tmp/llmvenv/bin/python scripts/peft_adalora_fixtures.py --check-rust-adapter target/rust_adalora/allocated
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_fixtures import INPUT_SHAPE, META, OUTPUT_RTOL, LlamaLike, factor_grads, state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "peft" / "adalora"

TARGETS = ["q_proj", "v_proj", "down_proj"]
INIT_R = 4
ALPHA = 8
# What the pattern case keeps (PEFT's rank allocator names modules `<path>.lora_E.<adapter>`).
PATTERN = {
    "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, False],
    "model.layers.1.self_attn.v_proj.lora_E.default": [False, False, False, True],
    "model.layers.0.mlp.down_proj.lora_E.default": [True, True, True, True],
}


def adalora_config(**over) -> AdaLoraConfig:
    """The fixtures' config; `over` replaces fields."""
    fields = dict(
        init_r=INIT_R,
        target_r=2,
        lora_alpha=ALPHA,
        lora_dropout=0.05,
        target_modules=TARGETS,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=10,
    )
    return AdaLoraConfig(**{**fields, **over})


def base_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return LlamaLike(bias=True).eval()


def make_input() -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1007))


def save_adapter(peft_model, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        out.mkdir(parents=True)
        shutil.copy(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def generate(case: str, root: Path, base: dict[str, torch.Tensor]) -> None:
    out = root / case
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = base_model()
    model.load_state_dict(base, strict=True)
    x = make_input()
    peft_model = get_peft_model(model, adalora_config()).eval()
    torch.manual_seed(300 + len(case))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_E." in name:
                param.copy_(torch.randn_like(param))
            elif ".lora_A." in name or ".lora_B." in name:
                param.copy_(0.3 * torch.randn_like(param))
    if case == "pattern":
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                key = name.removeprefix("base_model.model.")
                if key in PATTERN:
                    param.masked_fill_(~torch.tensor(PATTERN[key]).unsqueeze(-1), 0.0)
        peft_model.peft_config["default"].rank_pattern = dict(PATTERN)
    grads = factor_grads(peft_model, x, 17) if case == "plain" else {}
    with torch.no_grad():
        before = peft_model(x)
    save_adapter(peft_model, out / "adapter")

    # The outputs of the adapter as PEFT loads it back.
    model = base_model()
    model.load_state_dict(base, strict=True)
    loaded = PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    with torch.no_grad():
        unmerged_output = loaded(x)
        rel = ((unmerged_output - before).abs().max() / before.abs().max()).item()
        assert rel < 1e-6, f"{case}: PEFT's reloaded adapter differs from the saved one by {rel}"
        merged_model = loaded.merge_and_unload()
        merged_output = merged_model(x)
    merged = state_dict(merged_model)
    rel = ((unmerged_output - merged_output).abs().max() / merged_output.abs().max()).item()
    assert rel < OUTPUT_RTOL, f"{case}: PEFT's merged and unmerged outputs differ by {rel}"
    save_file(merged, out / "merged.safetensors", metadata=META)
    io = {"input": x, "unmerged_output": unmerged_output, "merged_output": merged_output, **grads}
    save_file({k: v.contiguous() for k, v in io.items()}, out / "io.safetensors", metadata=META)
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    shapes = {k: list(v.shape) for k, v in sorted(tensors.items()) if ".lora_E" in k}
    print(f"{case}: {len(tensors)} adapter tensors, E shapes {shapes}")


ALLOC_STEPS = 12


class LlamaLikeWithLoss(LlamaLike):
    """LlamaLike whose forward with a target returns an output with `.loss` (squared error), so
    that `AdaLoraModel.forward` adds its orthogonal regulariser as it does for transformers."""

    def forward(self, x, target=None):  # noqa: D102
        out = super().forward(x)
        if target is None:
            return out
        lm_loss = ((out - target) ** 2).mean()
        return SimpleNamespace(loss=lm_loss.clone(), lm_loss=lm_loss.detach().clone(), out=out)


def alloc_config(**over) -> AdaLoraConfig:
    return adalora_config(**{"lora_dropout": 0.0, "total_step": ALLOC_STEPS, "orth_reg_weight": 0.5, **over})


def budget_table(init_bgt: int, target_r: int, n_modules: int, **sched) -> dict:
    """PEFT's `RankAllocator.budget_schedule` for every step 0..=total_step + 1."""
    model = base_model()
    peft_model = get_peft_model(model, alloc_config(target_r=target_r, **sched))
    alloc = peft_model.base_model.rankallocator
    alloc.init_bgt = init_bgt
    alloc.target_bgt = target_r * n_modules
    steps = range(0, sched["total_step"] + 2)
    return {
        "init_bgt": init_bgt,
        "target_r": target_r,
        "n_modules": n_modules,
        **sched,
        "budget": [alloc.budget_schedule(s)[0] for s in steps],
        "mask": [bool(alloc.budget_schedule(s)[1]) for s in steps],
    }


def generate_alloc(root: Path, base: dict[str, torch.Tensor]) -> None:
    out = root / "alloc"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = LlamaLikeWithLoss(bias=True)
    model.load_state_dict(base, strict=True)
    torch.manual_seed(4241)  # PEFT's initialisation of A and B: whatever ran before
    peft_model = get_peft_model(model, alloc_config())
    peft_model.train()
    torch.manual_seed(4242)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_E." in name:
                param.copy_(0.3 * torch.randn_like(param))
    save_adapter(peft_model, out / "adapter")
    x = make_input()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2024))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    record: dict[str, torch.Tensor] = {}
    patterns = []

    def key(name: str) -> str:  # the file key: no adapter name
        return name.removeprefix("base_model.model.").replace(".default", "")

    for step in range(1, ALLOC_STEPS + 1):
        opt.zero_grad()
        # `AdaLoraModel.forward` adds the regulariser (`PeftModel.forward` would skip it).
        output = peft_model.base_model(x, target)
        assert output.loss.item() != output.lm_loss.item(), "no orthogonal regulariser in the loss"
        record[f"{step}.loss"] = output.loss.detach().reshape(1).clone()
        record[f"{step}.lm_loss"] = output.lm_loss.reshape(1)
        output.loss.backward()
        opt.step()
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                record[f"{step}.{key(name)}.param"] = p.detach().clone()
                record[f"{step}.{key(name)}.grad"] = p.grad.detach().clone()
        peft_model.base_model.update_and_allocate(step)
        for name, p in peft_model.named_parameters():
            if ".lora_E." in name:
                record[f"{step}.{key(name)}.after"] = p.detach().clone()
        rp = peft_model.peft_config["default"].rank_pattern
        patterns.append({key(k): list(v) for k, v in rp.items()} if rp else None)
    save_file({k: v.contiguous() for k, v in record.items()}, out / "steps.safetensors", metadata=META)
    expected = {
        "rank_pattern_after_step": patterns,
        "budget_schedules": [
            budget_table(24, 2, 6, tinit=2, tfinal=3, deltaT=2, total_step=ALLOC_STEPS),
            budget_table(360, 8, 30, tinit=10, tfinal=20, deltaT=5, total_step=100),
            budget_table(12, 1, 3, tinit=0, tfinal=0, deltaT=1, total_step=7),
        ],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    final = patterns[-1] or {}
    print(f"alloc: {len(record)} tensors, final rank pattern {final}")


def check_rust_adapter(adapter_dir: Path, root: Path) -> None:
    model = base_model()
    model.load_state_dict(load_file(root / "base.safetensors"), strict=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    for w in caught:
        print(f"  warning from PEFT: {w.message}")
    missing_warnings = [w for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing_warnings, f"PEFT reports missing adapter keys: {missing_warnings[0].message}"
    config = peft_model.peft_config["default"]
    assert config.peft_type == peft.PeftType.ADALORA, f"peft_type {config.peft_type}"

    # Load the file a second time by hand to see PEFT's incompatible keys directly. (Without the
    # rank pattern: PEFT would resize the already resized modules again, and fail.)
    file_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    rank_pattern, config.rank_pattern = config.rank_pattern, None
    result = set_peft_model_state_dict(peft_model, file_tensors)
    config.rank_pattern = rank_pattern
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not unexpected, f"unexpected keys: {unexpected}"
    assert not missing, f"missing LoRA keys: {missing}"
    state = peft.get_peft_model_state_dict(peft_model)
    assert set(state) == set(file_tensors), (
        f"key sets differ: only in PEFT {sorted(set(state) - set(file_tensors))}, "
        f"only in file {sorted(set(file_tensors) - set(state))}"
    )
    for k, v in file_tensors.items():
        assert torch.equal(state[k], v), f"{k} was not loaded as stored"
    layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.adalora.AdaLoraLayer)]
    assert 3 * len(layers) == len(file_tensors), f"{len(layers)} AdaLoRA layers but {len(file_tensors)} tensors"
    ranks = {
        n: (m.r["default"], float(m.ranknum["default"]))
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.adalora.AdaLoraLayer)
    }

    io = load_file(adapter_dir / "io.safetensors")
    with torch.no_grad():
        ours = peft_model(io["input"])
        rel = ((ours - io["output"]).abs().max() / io["output"].abs().max()).item()
        merged = peft_model.merge_and_unload()(io["input"])
        rel_merged = ((merged - io["output"]).abs().max() / io["output"].abs().max()).item()
    print(f"  (rank, ranknum) per layer: {ranks}")
    print(
        f"{adapter_dir}: PEFT loaded {len(file_tensors)} tensors ({len(layers)} AdaLoRA layers), "
        f"no missing or unexpected keys; rel. output error unmerged {rel:.3e}, merged {rel_merged:.3e}"
    )
    assert rel <= OUTPUT_RTOL and rel_merged <= OUTPUT_RTOL, f"outputs differ (tolerance {OUTPUT_RTOL})"
    print("OK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixture root (default: tests/fixtures/peft/adalora)")
    parser.add_argument("--case", choices=["plain", "pattern", "alloc"], action="append", help="only these cases (default: all)")
    parser.add_argument("--check-rust-adapter", metavar="DIR", help="load an adapter saved by the Rust side in PEFT")
    args = parser.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    if args.check_rust_adapter:
        check_rust_adapter(Path(args.check_rust_adapter), args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    base = state_dict(base_model())
    save_file(base, args.out / "base.safetensors", metadata=META)
    for case in args.case or ["plain", "pattern", "alloc"]:
        if case == "alloc":
            generate_alloc(args.out, base)
        else:
            generate(case, args.out, base)
    (args.out / "VERSIONS.txt").write_text(f"torch {torch.__version__}\npeft {peft.__version__}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
