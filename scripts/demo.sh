#!/usr/bin/env bash
# The demo: set up, write the bundled synthetic stream as MDS shards, train a tiny Llama for a few
# minutes on 2 CPU ranks (DeepSpeed ZeRO-3 by default) with Filter-then-Weight selection, print the summary.
#   ENGINE=fsdp2 METHOD=random LAUNCHER=deepspeed bash scripts/demo.sh   # variations
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/optsel/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ENGINE=${ENGINE:-deepspeed}
METHOD=${METHOD:-ftw}
LAUNCHER=${LAUNCHER:-torchrun}
NPROC=${NPROC:-2}
.venv/bin/optsel prepare configs/prepare_synthetic.yaml overwrite=true
# --overwrite: a rerun of the demo moves the previous demo's checkpoints aside (nothing is deleted)
.venv/bin/optsel launch --nproc "$NPROC" --launcher "$LAUNCHER" --overwrite configs/demo.yaml \
  engine.name="$ENGINE" selection.method="$METHOD" run_name="demo-$ENGINE-$METHOD" "$@"
