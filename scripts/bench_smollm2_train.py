#!/usr/bin/env python3
"""PyTorch + PEFT side of the SmolLM2-135M LoRA training step (benches/lora.rs,
`smollm2_train/135m/lora_qv_b8x128`): the GGUF loaded by transformers in f32, LoRA r=8,
alpha=16 on q_proj and v_proj, batch 8 x 128 random tokens, AdamW, forward + backward + step.

    /tmp/llmvenv/bin/python scripts/bench_smollm2_train.py "$(scripts/fetch-smollm2.sh)"

Prints the median step time of 5 steps after 2 warm-up steps and the tokens/s.
"""

import os
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    path = sys.argv[1]
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, length = 8, 128
    ids = torch.randint(0, 49152, (batch, length + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(7):
        start = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    print(f"torch {torch.__version__} threads {threads}: step {t:.2f} s, {batch * length / t:.0f} tokens/s")


if __name__ == "__main__":
    main()
