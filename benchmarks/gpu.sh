#!/bin/bash
# The GPU measurements of the speed issue, as one script for a machine with a CUDA device (about 5 minutes on an H100/H200).
# Usage: OFFICIAL_DIR=/path/to/FastConvMAE PEAK_TFLOPS=989 bash benchmarks/gpu.sh > gpu_bench.txt
# (989 TFLOP/s: dense bf16 of an H100/H200 SXM; use your device's datasheet figure.)
set -e
cd "$(dirname "$0")/.."
PY=${PY:-python}
OFF=${OFFICIAL_DIR:+--official_dir $OFFICIAL_DIR}
PEAK=${PEAK_TFLOPS:-989}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for bs in 64 128; do
  # Fast ConvMAE-B, 224 px, bf16 autocast: eager and torch.compile'd, channels-last, the official code alongside
  $PY benchmarks/pretrain_step.py --config base --bs $bs --device cuda --precision bf16 --compile both --channels_last \
      --steps 10 --warmup 3 --peak_tflops $PEAK $OFF
done
# the loader at 224 px from camera-sized JPEGs, per worker process (a GPU step needs bs / step time images per second)
$PY benchmarks/data_loader.py --path ../shared/data/balloon/train --sizes 224 --workers 1 4 --bs 64 --batches 8 --fast_decode both --upscale 3072
