#!/usr/bin/env bash
# The demo: set up, write the demo stream as MDS shards (the quality grid's cell t40-c25-lh: copy is the target,
# 25 % corrupted copies, the look-alike reverse heavy) and the grid's pre-trained base model, then train it on
# 2 CPU ranks (DeepSpeed ZeRO-3 by default) once with random selection and once with Filter-then-Weight, same
# stream, seed and steps, and print both side by side (runs/demo-compare.png: both target-loss curves).
#   ENGINE=fsdp2 METHODS="random ftw" LAUNCHER=deepspeed bash scripts/demo.sh   # variations; METHOD=ftw: one run
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/optsel/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ENGINE=${ENGINE:-deepspeed}
METHODS=${METHOD:-${METHODS:-random ftw}}
LAUNCHER=${LAUNCHER:-torchrun}
NPROC=${NPROC:-2}
# The stream is rewritten only when its config or the code that writes it changed (a rewrite moves the old one
# aside to data/demo.replaced-<time>, never deleting it), so reruns do not pile up copies.
stamp=$(cat configs/demo_stream.yaml pipeline/data/prepare.py pipeline/data/records.py pipeline/data/synthetic.py pipeline/data/tokenizer.py \
  | sha256sum | cut -d' ' -f1)
if [ -f data/demo/prepare_report.json ] && [ "$(cat data/demo/.demo_stream.sha256 2>/dev/null)" = "$stamp" ]; then
  echo "kept data/demo: written by this config and code"
else
  .venv/bin/optsel prepare configs/demo_stream.yaml overwrite=true
  echo "$stamp" > data/demo/.demo_stream.sha256
fi
.venv/bin/python -m benchmarks.demo_base data/demo-base   # kept when it is already this grid's base
runs=()
for method in $METHODS; do
  # --overwrite: a rerun of the demo moves the previous demo's checkpoints aside (nothing is deleted)
  .venv/bin/optsel launch --nproc "$NPROC" --launcher "$LAUNCHER" --overwrite configs/demo_compare.yaml \
    engine.name="$ENGINE" selection.method="$method" run_name="demo-$ENGINE-$method" "$@"
  runs+=("runs/demo-$ENGINE-$method")
done
.venv/bin/optsel compare "${runs[@]}" --plot runs/demo-compare.png
