#!/usr/bin/env bash
# The ablation workflow on the GPT-2 E2E recipe, shrunk (:runlocal): three separately trained
# runs, one table, then re-scoring, export and prediction from the saved runs, no retraining.
# Run from any empty folder; results as in experiments/results/ablation_workflow_cpu/.
set -euo pipefail
C="$(cd "$(dirname "$0")/.." && pwd)/configs"
for m in lora full top2; do ftlab train "$C/gpt2_e2e.py:$m,runlocal"; done   # runs/gpt2_e2e-<m>-runlocal
ftlab compare runs/gpt2_e2e-*-runlocal --out runs/e2e_table
ftlab eval runs/gpt2_e2e-lora-runlocal --split test --checkpoint best   # = summary.json's test
ftlab export runs/gpt2_e2e-lora-runlocal --hf out/hf --peft out/adapter
head -3 "$C/data/e2e_sample.jsonl" > prompts.jsonl
ftlab predict runs/gpt2_e2e-lora-runlocal --input prompts.jsonl --output predictions.jsonl
ftlab sweep "$C/gpt2_e2e_lora_rank.py:runlocal" --workdir runs/e2e_rank
