#!/usr/bin/env bash
# The prepared command of a lent GPU machine (see eval/README.md): installs the carried wheels
# (.whl: diffusers, importlib_metadata, torchao, sageattention; the machine has none of them and no
# network), then runs eval/bench_gpu.py with the given arguments, its log and JSON going to $OUT.
#   device run, carry [".whl"]:  bash eval/gpu_run.sh NAME [bench_gpu.py arguments...]
set -o pipefail
name=${1:-bench}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee "$OUT/$name-gpu.txt"
python3 eval/bench_gpu.py --out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
