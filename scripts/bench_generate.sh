#!/bin/sh
# `lora generate` beside transformers' `generate` on SmolLM2-135M-Instruct (GGUF Q4_1, dequantized
# to f32 on both sides), same threads, one run: prompt and generation tokens/s for three chat
# prompts, and the peak RSS of loading the model + 1 token. Prints a markdown table; with --write
# it also puts the table into BENCHMARKS.md between the `bench-generate` markers.
#
#   PYTHON=/tmp/llmvenv/bin/python scripts/bench_generate.sh            # ~4 min on 2 cores
#   PYTHON=/tmp/llmvenv/bin/python scripts/bench_generate.sh --write BENCHMARKS.md
#
# PYTHON: a venv from scripts/requirements.txt (torch, transformers, gguf). LORA_BIN: the `lora`
# binary to time (default: target/release/lora, built here with cargo first). BENCH_THREADS
# (default 2) sets the threads of both sides (RAYON_NUM_THREADS, torch.set_num_threads). The model
# comes from scripts/fetch-smollm2.sh (downloaded once into its cache). Raw numbers go to
# target/bench-data/generate.json.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ -z "${LORA_BIN:-}" ]; then
    cargo build --release --bin lora >&2
    LORA_BIN="${CARGO_TARGET_DIR:-target}/release/lora"
fi
GGUF="$(PYTHON="$PYTHON" scripts/fetch-smollm2.sh)"
exec "$PYTHON" scripts/bench_generate.py report --python "$PYTHON" --lora "$LORA_BIN" --gguf "$GGUF" "$@"
