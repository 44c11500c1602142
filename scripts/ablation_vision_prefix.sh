#!/usr/bin/env bash
# The vision-prefix ablation of docs/MODEL.md: the default recipe for 300 steps without recall items,
# with and without the decoder's vision prefix, each scored by bitmar-eval on 100 held-out scenes.
# About 2 × 10 minutes on one busy CPU core. Results: runs/ablation_prefix_{true,false}/eval.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
for prefix in true false; do
  .venv/bin/bitmar-train --config config/train_default.yaml --run-dir "runs/ablation_prefix_$prefix" \
    --set model.vision_prefix=$prefix --set train.steps=300 --set train.t0=270 --set train.warmup_steps=30 \
    --set data.recall_items=0 --set output.packed_checkpoint=null --set train.eval_every=1000 \
    --set train.save_every=1000
  .venv/bin/bitmar-eval --checkpoint "runs/ablation_prefix_$prefix/model_packed.safetensors" --tasks captioning \
    --n 100 --session-n 0 --threads 1 --out "runs/ablation_prefix_$prefix/eval.json"
done
