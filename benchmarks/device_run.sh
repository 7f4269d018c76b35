#!/usr/bin/env bash
# The issue-15 checks on a lent GPU machine (no network there; torch/transformers/peft come with its
# image, optsel is put on PYTHONPATH by folder links): the single-pass gradient check on CUDA (fp32 and
# bf16), the speed benchmark on CUDA (100M-parameter model) and on that machine's quiet CPU.
#   OUT=/some/folder bash benchmarks/device_run.sh
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
pkg=/tmp/optsel_pkg
rm -rf "$pkg" && mkdir -p "$pkg/optsel"
cp "$repo"/optsel/*.py "$pkg/optsel/"
for d in selection pipeline launch monitoring configs; do ln -s "$repo/$d" "$pkg/optsel/$d"; done
export PYTHONPATH="$pkg:$repo" PYTHONUNBUFFERED=1
cd /tmp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m benchmarks.single_pass_check --device cuda --dtype float32 2>&1 | tee "$OUT/single_pass_cuda.txt"
timeout 120 python3 -m benchmarks.single_pass_check --device cuda --dtype bfloat16 2>&1 | tee -a "$OUT/single_pass_cuda.txt"
# since 2026-11-27 the speed benchmark runs 5 interleaved rounds, counts FLOPs and runs an N/k/|V| FLOP grid
# (N up to 1024): budgets raised from 240/150 s by estimate, not yet measured on a GPU machine
timeout "${GPU_S:-360}" python3 -m benchmarks.speed --device cuda --max-T "${GPU_MAX_T:-4096}" --out "$OUT/speed_cuda" 2>&1 | tail -60
# the overhead ratio: each method's step / a plain step on the k it trains on, N/k 2, 4, 8 (estimated budget, unmeasured)
timeout "${OVH_S:-300}" python3 -m benchmarks.overhead --device cuda --sizes gpu-100m,cpu-compute --ratios 2,4,8 --out "$OUT/overhead_cuda" 2>&1 | tail -80
timeout "${CPU_S:-240}" python3 -m benchmarks.speed --device cpu --max-T 1024 --out "$OUT/speed_cpu16" 2>&1 | tail -60
ls -R "$OUT"
