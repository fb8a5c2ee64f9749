#!/usr/bin/env bash
# Installs a CUDA 13.2 toolkit (nvcc, headers, runtime) from PyPI wheels into a directory, for
# building the `cuda` feature on a machine without a GPU or a system CUDA. Prints the environment
# to use, so callers can `eval "$(scripts/cuda-toolkit.sh)"`.
#
#   DIR defaults to ~/.cache/lora-cuda/toolkit. nvcc 13.2 works with gcc 12; newer nvcc releases
#   are newer than cudarc supports, and the cu12 nvcc wheel ships no nvcc binary.
set -euo pipefail
dir=${1:-${LORA_CUDA_TOOLKIT:-$HOME/.cache/lora-cuda/toolkit}}
cuda_home="$dir/nvidia/cu13"
if [ ! -x "$cuda_home/bin/nvcc" ]; then
  mkdir -p "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --target "$dir" \
    nvidia-cuda-nvcc==13.2.86 "nvidia-cuda-runtime==13.2.*" "nvidia-cuda-crt==13.2.*" \
    "nvidia-nvvm==13.2.*" nvidia-cuda-cccl==13.2.86 >&2
fi
# The wheels spread the toolkit over one prefix; make sure nvcc finds its pieces.
[ -x "$cuda_home/bin/nvcc" ] || { echo "nvcc not found under $cuda_home" >&2; exit 1; }
echo "export CUDA_HOME=$cuda_home"
echo "export CUDA_PATH=$cuda_home"
echo "export PATH=$cuda_home/bin:\$PATH"
echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
