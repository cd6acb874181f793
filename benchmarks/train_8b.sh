#!/bin/bash
# `tuneforge train` itself on a random Llama-3-8B HF folder (the benchmark's seeded weights, SmolLM2's tokenizer):
# 5,848 real P3 examples packed into 4×2048 rows, LoRA r=16 on all 7 projections, the GPU defaults (planner, Liger);
# then the FP8 base with compiled layers.
#   bash benchmarks/train_8b.sh OUT [STEPS]     # on the GPU machine; OUT gets metrics.jsonl and the summary
set -o pipefail
out=${1:?output folder}; steps=${2:-40}
dir=$(python3 -c "
import sys, torch; sys.argv = ['x']; sys.path[:0] = ['benchmarks', 'src']
import speed_gpu
from tuneforge.models.shapes import shape_config
print(speed_gpu.random_model_dir(shape_config('llama-3-8b'), torch.device('cuda')))" | tail -1) || exit 1
for precision in bf16 fp8; do
  cat > /tmp/train_8b_$precision.yaml <<YAML
model: $dir
output_dir: /tmp/runs/train-8b-$precision
data:
  train: [{path: .bench/p3_train.jsonl}]
  max_seq_len: 2048
  skip_bad: true
method:
  name: lora
  lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear, base_precision: $precision}
train: {max_steps: $steps, batch_size: 4, lr: 2.0e-4, log_every: 1, compile: $([ $precision = fp8 ] && echo true || echo false)}
YAML
  python3 -m tuneforge.cli train -c /tmp/train_8b_$precision.yaml --overwrite 2>&1 | tail -22
  cp /tmp/runs/train-8b-$precision/metrics.jsonl "$out/train_8b_${precision}_metrics.jsonl"
  python3 - "$out/train_8b_${precision}_metrics.jsonl" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
speeds = sorted(r["tokens_per_s"] for r in recs[5:])  # after compilation and warm-up
print(f"{sys.argv[1]}: {len(recs)} steps; tokens/s after step 5: median {speeds[len(speeds) // 2]:,.0f} "
      f"(min {speeds[0]:,.0f}, max {speeds[-1]:,.0f}); first steps {[round(r['tokens_per_s']) for r in recs[:5]]}")
PY
done
