#!/usr/bin/env bash
# The GPU check (issue 13): 7B-shaped bf16 versions of the four paper checkpoints on one GPU,
# each experiment's core timed against a plain forward, peak CUDA memory; writes
# benchmarks/GPU_CHECK.md. Under 8 minutes on one H200. Run from the repository root after
# `pip install -e ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 480 python benchmarks/gpu_check.py "$@"
