#!/usr/bin/env bash
# One device session: the test suite and the default experiment on a GPU (jax 0.11, CUDA),
# where compute_dtype "auto" means bfloat16. Run through the device tool with `.whl` carried
# (ml-collections and tensorboardX wheels, absent from the GPU image); outputs land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
} 2>&1 | tee "$OUT/env.txt"
start=$(date +%s)
timeout 320 python3 -m ftlab train configs/digits_transfer.py --workdir /tmp/gpu_run 2>&1 \
  | grep -v "step/s" > "$OUT/experiment_gpu.log"
echo "default experiment: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"
cp /tmp/gpu_run/results.md "$OUT/results_gpu.md" 2>/dev/null
grep -h compute_dtype /tmp/gpu_run/full/seed_0/config.json >> "$OUT/env.txt" 2>/dev/null
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -40 > "$OUT/pytest_gpu.log"
tail -5 "$OUT/pytest_gpu.log"
