#!/usr/bin/env bash
# tpc's GPU check: one call, at most 8 minutes, on a machine with one NVIDIA GPU and PyTorch,
# Triton and timm installed (nothing is downloaded). Run from the repository root.
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 python3 -u benchmarks/gpu_check.py
