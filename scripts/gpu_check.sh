#!/usr/bin/env bash
# Exercise the CUDA/NCCL paths on a GPU machine (used on the lent GPU machine; wheels for packages its
# image lacks are expected in .whl/, see docs). Writes logs to ${OUT:-/tmp/optsel-gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/optsel-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tee "$OUT/versions.txt"
python3 -m optsel.launch.cli prepare configs/prepare_synthetic.yaml out_dir=/tmp/optsel-data overwrite=true > "$OUT/prepare.log" 2>&1 || { tail -30 "$OUT/prepare.log"; exit 1; }
rc=0
for engine in deepspeed fsdp2; do
  for method in ${METHODS:-random ftw}; do
    python3 -m torch.distributed.run --nproc_per_node 1 -m optsel.launch.train configs/demo.yaml \
      data.local=/tmp/optsel-data engine.name=$engine selection.method=$method run_name=gpu-$engine-$method \
      output_dir=$OUT/runs training.progress_bar=false training.num_steps=${STEPS:-60} "$@" > "$OUT/train-$engine-$method.log" 2>&1
    code=$?; echo "train $engine $method: exit $code"; [ $code -eq 0 ] || { rc=1; tail -40 "$OUT/train-$engine-$method.log"; }
    [ -f "$OUT/runs/gpu-$engine-$method/summary.json" ] && cat "$OUT/runs/gpu-$engine-$method/summary.json"
  done
done
exit $rc
