#!/usr/bin/env bash
# One device session (one H200, < 10 min): `ftlab bench --torch` at full size -- GPT-2-medium
# 8x1024 full / LoRA r=4 q,v / top-2 blocks and LLaMA-7B 16x256 LoRA r=8 q,v over a bf16 base,
# bf16 compute -- ftlab's jitted step beside transformers + PEFT (eager, torch.compile), each
# case in its own process. The GPU image has jax, flax, optax, torch, transformers and peft;
# ml-collections and tensorboardX travel as wheels in .whl (see experiments/gpu_check.sh), e.g.
#   run(command="bash experiments/gpu_bench.sh", carry=[".whl"], timeout_s=590)
# Results (bench.json, bench.md, bench.log; compile/ likewise) land in $OUT, else
# experiments/results/bench_h200; bench.json is rewritten after every case, so a pass cut short
# keeps the cases it finished. About 9.5 minutes in all.
set -o pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
OUT=${OUT:-experiments/results/bench_h200}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# Pass 1: every case, ftlab beside torch eager (the rows the targets need first);
# pass 2 with the time left: ftlab again beside torch.compile (slow to compile), in $OUT/compile.
# STEPS / WARMUP / CASES may be overridden (CASES="--case gpt2m-lora --case llama7b-lora").
timeout "${EAGER_TIMEOUT:-330}" python3 -m ftlab bench --torch --torch-modes eager \
  --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" ${CASES:-} --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "eager pass: exit $?"
mkdir -p "$OUT/compile"
timeout "${COMPILE_TIMEOUT:-230}" python3 -m ftlab bench --torch --torch-modes compile \
  --steps "${STEPS:-10}" --warmup "${WARMUP:-3}" ${CASES:-} --out "$OUT/compile" 2>&1 \
  | tee "$OUT/compile/bench.log"
echo "compile pass: exit $? (a timeout keeps the cases it finished)"
cat "$OUT/bench.md" "$OUT/compile/bench.md" 2>/dev/null
