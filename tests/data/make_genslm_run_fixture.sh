#!/usr/bin/env bash
# Made tests/data/genslm_run_a0157cc: a run checkpointed by the code before the common trainer
# (commit a0157cc), to test that checkpoints written then still resume. Run from the repo root.
set -euo pipefail
tmp=$(mktemp -d)
git worktree add "$tmp/src" a0157cc
PYTHONPATH="$tmp/src/src" python3 -m ds4sci.cli train genslm --out_dir="$tmp/run" --progress=false \
  optim.max_steps=4 checkpoint_every=2 eval_every=2 data.n_simulated=4 data.max_tokens=64 \
  model.hidden_size=32 model.num_attention_heads=2 model.intermediate_size=64 model.num_hidden_layers=2 \
  optim.warmup_steps=1
out=tests/data/genslm_run_a0157cc
rm -rf "$out" && mkdir -p "$out/checkpoints"
cp -r "$tmp/run/checkpoints/step-00000002" "$out/checkpoints/"
printf "step-00000002\n" > "$out/checkpoints/latest"
cp "$tmp/run/config.yaml" "$out/"
cp "$tmp/run/metrics.jsonl" "$out/expected_metrics.jsonl"   # all 4 steps of the uninterrupted run
git worktree remove --force "$tmp/src"
