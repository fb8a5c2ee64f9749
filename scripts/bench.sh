#!/bin/sh
# One command for the side-by-side benchmarks: runs `cargo bench --bench lora` and
# scripts/bench_peft.py (PyTorch + PEFT) case by case, then writes the table into BENCHMARKS.md.
#
#   scripts/bench.sh                      # PYTHON defaults to python3; it needs scripts/requirements.txt
#   PYTHON=/path/to/venv/bin/python scripts/bench.sh --rounds 3
#
# About 10 minutes on 2 cores; a random 324 MB model for the `lora merge` case is generated once
# under target/bench-data/. BENCH_THREADS (default 2) sets the threads of both sides.
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/bench_report.py --python "${PYTHON:-python3}" "$@"
