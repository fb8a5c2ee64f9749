#!/usr/bin/env python3
"""PiSSA / OLoRA fixtures for tests/peft_decompose.rs, made with PEFT 0.21.2.

For each case in tests/fixtures/peft/decompose/<case>/ (`pissa`, `pissa_niter_2`, `olora`), a tiny
model `Net` (q_proj 16 -> 24, v_proj 24 -> 16, with biases; forward `v_proj(q_proj(x))`, mirrored
in the Rust test) gets a PEFT adapter with `init_lora_weights = <case>` (r = 4, alpha = 8), and:

    base.safetensors       the original weights (before PEFT took the adapter out of them)
    residual.safetensors   the base after initialisation: W_res = W - s B0 A0
    initial/               the adapter right after initialisation (A0, B0)
    trained/               the adapter after a simulated training step (A, B moved)
    converted/             PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=
                           initial/)` of the trained adapter: a plain LoRA adapter of rank 2r
                           against the ORIGINAL base ([A; A0], [B, -B0], alpha doubled)
    io.safetensors         `input`, and `output`: the trained model (residual base + trained
                           adapter), which the converted adapter on the original base reproduces

Setup and run (CPU only; CI reads the committed fixtures):

    /tmp/llmvenv/bin/python scripts/peft_decompose_fixtures.py

Reverse direction: adapters made here (PiSSA and OLoRA, exact) load in PEFT. PEFT loads a config
whose `init_lora_weights` is "pissa" / "olora" onto the ORIGINAL base by decomposing it again, so
our trained adapter on the original base must give our trained model's output; the converted
adapter too, as plain LoRA:

    PEFT_DECOMPOSE_OUT=target/rust_decompose cargo test --test peft_decompose -- --ignored write_rust_adapters
    /tmp/llmvenv/bin/python scripts/peft_decompose_fixtures.py --check-rust target/rust_decompose
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "peft" / "decompose"
CASES = ["pissa", "pissa_niter_2", "olora"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 24)
        self.v_proj = nn.Linear(24, 16)

    def forward(self, x):
        return self.v_proj(self.q_proj(x))


def base_state(model):
    """The base layers' weights under their plain names (`q_proj.weight`)."""
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer", "")
        out[k] = v.detach().clone().contiguous()
    return out


def check_rust(root):
    for case in ["pissa", "olora"]:
        d = Path(root) / case
        io = load_file(d / "io.safetensors")
        for adapter in ["trained", "converted"]:
            net = Net()
            net.load_state_dict(load_file(OUT / case / "base.safetensors"))
            model = PeftModel.from_pretrained(net, d / adapter)
            keys = set(load_file(d / adapter / "adapter_model.safetensors"))
            state = {k for k in model.state_dict() if "lora_" in k}
            assert len(keys) == len(state), (keys, state)
            with torch.no_grad():
                y = model(io["input"])
            err = (y - io["output"]).abs().max().item() / io["output"].abs().max().item()
            print(f"{case} {adapter}: {len(keys)} tensors, relative output error {err:.1e}")
            assert err < 1e-4


def main():
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--check-rust":
        check_rust(sys.argv[2])
        return
    torch.manual_seed(0)
    for case in CASES:
        d = OUT / case
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        torch.manual_seed(1)
        net = Net()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, d / "base.safetensors",
                  metadata={"format": "pt"})
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=case)
        torch.manual_seed(2)  # pissa_niter's sketch
        model = get_peft_model(net, config)
        save_file(base_state(model), d / "residual.safetensors", metadata={"format": "pt"})
        model.save_pretrained(d / "initial")
        # A simulated training step: every factor moves.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(d / "trained")
        x = torch.randn(2, 3, 16)
        with torch.no_grad():
            y = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, path_initial_model_for_weight_conversion=str(d / "initial"))
            shutil.copytree(tmp, d / "converted")
        save_file({"input": x, "output": y}, d / "io.safetensors", metadata={"format": "pt"})
        for card in d.glob("*/README.md"):  # PEFT's model cards: nothing the tests read
            card.unlink()

        # Check the conversion the way a user relies on it: the converted adapter on the ORIGINAL
        # base gives the trained model's output.
        torch.manual_seed(1)
        fresh = Net()
        fresh.load_state_dict(load_file(d / "base.safetensors"))
        converted = PeftModel.from_pretrained(fresh, d / "converted")
        with torch.no_grad():
            y2 = converted(x)
        err = (y2 - y).abs().max().item()
        cfg = json.loads((d / "converted" / "adapter_config.json").read_text())
        print(f"{case}: converted r={cfg['r']} alpha={cfg['lora_alpha']}, "
              f"on the original base max |diff| {err:.2e}")
        assert err < 1e-4 * y.abs().max().item()


if __name__ == "__main__":
    main()
