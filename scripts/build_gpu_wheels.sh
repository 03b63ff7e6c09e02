#!/usr/bin/env bash
# Build the wheel folder that the GPU machines (Python 3.12, manylinux x86_64, no network) need:
# open360's dependencies that their image lacks. Usage: scripts/build_gpu_wheels.sh [OUT_DIR] [extra...]
#   default OUT_DIR=wheels/ (git-ignored; carried to the device with `carry: ["wheels"]`).
#   On the device: pip install --no-index --find-links wheels -e . --no-deps && \
#                  pip install --no-index --find-links wheels hydra-core omegaconf datasketch megatron-core
set -euo pipefail
out=${1:-wheels}
shift || true
mkdir -p "$out"
# megatron-core is pinned to the version CPU CI installs (0.16.1, the last for Python 3.11), so the GPU
# tests exercise the same code; pass e.g. "megatron-core==0.19.2" with another OUT_DIR to try a newer one.
# Light, pure-Python deps the training/analysis path needs (torch, numpy, pyarrow, safetensors,
# tokenizers, transformers, tqdm, matplotlib are already in the GPU image). setuptools: the build backend
# of `pip install --no-index ... -e .` (pyproject's build-system), which build isolation installs from here.
pip download --dest "$out" --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --implementation cp --no-deps \
  "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "datasketch>=1.6,<3" "megatron-core==0.16.1" "setuptools>=68" \
  "$@" 2>&1 | tail -2
# antlr4-python3-runtime 4.9.3 is an sdist only: build it into a wheel here.
if ! ls "$out"/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
  pip wheel --no-deps --wheel-dir "$out" "antlr4-python3-runtime==4.9.3" 2>&1 | tail -1
fi
ls -1 "$out"
