#!/usr/bin/env bash
# The GPU path in one run: the GPU's bf16 matmul peak, the GPU profile's training tokens/s and
# MFU against it, held-out bits per byte after a 10-minute budget (benchmarks/gpu_check.py).
# Without an NVIDIA GPU it runs its CPU fallback (a tiny profile, seconds): make test runs that.
#   benchmarks/gpu_check.sh [--budget-s 600] [-S key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m benchmarks.gpu_check "$@"
