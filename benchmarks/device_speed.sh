#!/bin/bash
# The GPU speed work's device calls, one phase per call (results under $OUT; carry .whl and .bench):
#   bash benchmarks/device_speed.sh 1        # GPU tests; 8B LoRA: the fastest HF peer, ours (Liger, FP8, compiled), Unsloth
#   bash benchmarks/device_speed.sh 2 CASES  # speed_gpu.py on a comma-separated list (2026-12-01: round 2, QLoRA, 1B)
#   bash benchmarks/device_speed.sh 3        # FP8 quality (random 8B, 200 steps); P3 cases
#   bash benchmarks/device_speed.sh 4        # `tuneforge train` on a random 8B folder (bf16; FP8 + compile); Unsloth P3
#   bash benchmarks/device_speed.sh 5 CASES  # the GPU tests of the speed work, then speed_gpu.py on CASES
#   bash benchmarks/device_speed.sh 6 CASES  # the GPU tests that failed or are new since phase 5, then CASES
#   bash benchmarks/device_speed.sh 7 CASES  # the GPU tests of grouped LoRA projections and the loss, then CASES
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_target /tmp/site .whl/*.whl || exit 1
pip_target /tmp/site_unsloth .whl/unsloth/*.whl || echo "unsloth wheels did not install"
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/session.log"
speed() { python3 benchmarks/speed_gpu.py --rounds 1 --out "$OUT" "$@"; }
case "$1" in
  1)
    python3 -m pytest -q -p no:cacheprovider tests/quant/test_fp8.py tests/train/test_kernels.py 2>&1 \
      | tee "$OUT/tests.log" | tail -4
    speed --budget 470 --cases peer-8b-lora-liger-off,ours-8b-lora-liger,ours-8b-lora-fp8,ours-8b-lora-compile,ours-8b-lora-fp8-compile,unsloth-8b-lora
    ;;
  2)
    speed --budget 540 --cases "$2"
    ;;
  3)
    python3 benchmarks/fp8_quality.py --model llama-3-8b --steps 200 --seq 2048 --rows 1 --out "$OUT" 2>&1 \
      | tee -a "$OUT/session.log" | tail -3
    bash benchmarks/train_8b.sh "$OUT" "${2:-30}" 2>&1 | tee -a "$OUT/session.log" | grep -v "^\[\|it/s\]" | tail -30
    speed --budget 230 --cases peer-8b-p3,ours-8b-p3-liger,ours-8b-p3-fp8,unsloth-8b-p3
    ;;
  5)
    python3 -m pytest -q -p no:cacheprovider tests/methods/test_lora_ops.py tests/quant tests/train/test_loss.py \
      tests/train/test_optimizer.py tests/train/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -15
    speed --budget 470 --cases "$2"
    ;;
  6)
    python3 -m pytest -q -p no:cacheprovider tests/methods/test_lora_ops.py tests/quant/test_linear4bit.py \
      tests/quant/test_fp8.py tests/train/test_optimizer.py tests/train/test_loss.py -k "gpu or cuda or fused or \
      fsdp or compiled or inductor or qlora or bitsandbytes" tests/quant/test_nf4.py::test_nf4_codes_and_scales_equal_bitsandbytes \
      2>&1 | tee "$OUT/tests.log" | tail -15
    speed --budget 450 --cases "$2"
    ;;
  7)
    python3 -m pytest -q -p no:cacheprovider tests/methods/test_lora_groups.py tests/methods/test_lora_ops.py \
      tests/train/test_loss.py 2>&1 | tee "$OUT/tests.log" | tail -8
    speed --budget 450 --cases "$2"
    ;;
  4)
    bash benchmarks/train_8b.sh "$OUT" "${2:-30}" 2>&1 | tee -a "$OUT/session.log" | grep -v "^\[\|it/s\]" | tail -40
    speed --budget 100 --cases unsloth-8b-p3
    ;;
esac
