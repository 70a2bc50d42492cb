#!/bin/bash
# The GPU measurements of the speed issue, as one script for a machine with a CUDA device (4.5 minutes on an H200).
# Usage: OFFICIAL_DIR=/path/to/FastConvMAE PEAK_TFLOPS=989 bash benchmarks/gpu.sh
# (989 TFLOP/s: dense bf16 of an H100/H200 SXM; use your device's datasheet figure.)
# LOADER_DATA: a folder of JPEGs for the loader and the end-to-end run (default: the balloon photos);
# LOG_DIR: where each part's output is also written (default: benchmarks/results/gpu).
set -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OFF=${OFFICIAL_DIR:+--official_dir $OFFICIAL_DIR}
PEAK=${PEAK_TFLOPS:-989}
DATA=${LOADER_DATA:-../shared/data/balloon/train}
LOG=${LOG_DIR:-benchmarks/results/gpu}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS
stamp() { echo "== $1 (at ${SECONDS}s: $((SECONDS - T0)) s since start)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/device.txt"
for bs in 64 128; do
  stamp "Fast ConvMAE-B, 224 px, batch $bs, bf16: eager, torch.compile (channels-last), official code alongside"
  $PY benchmarks/pretrain_step.py --config base --bs $bs --device cuda --precision bf16 --compile both --channels_last \
      --steps 10 --warmup 3 --peak_tflops $PEAK $OFF 2>&1 | grep -v Warning | tee "$LOG/base_bs$bs.txt"
done
# the package's own pretraining command end to end on the GPU: DDP under torchrun (one process), fused AdamW,
# the recipe's fp16 with loss scaling, pinned memory and asynchronous copies, reduced JPEG decoding; 61 photos, 1 epoch,
# 2 steps (a smoke test, not a timing)
stamp "fastconvmae_pretrain under torchrun, Fast ConvMAE-B"
OUTDIR=$(mktemp -d)
$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m fastconvmae.pretrain --data "$DATA" --preset fastconvmae_base --epochs 1 \
    --warmup_epochs 0 --bs 32 --accum 1 --workers 4 --fast_decode --output "$OUTDIR/run" 2>&1 | grep -v Warning \
    | tee "$LOG/pretrain_torchrun.txt"
ls "$OUTDIR/run" | tee -a "$LOG/pretrain_torchrun.txt"
# the loader at 224 px from camera-sized JPEGs, per worker process (a GPU step needs bs / step time images per second)
stamp "data loader, 224 px, photos re-saved at 3,072 px"
$PY benchmarks/data_loader.py --path "$DATA" --sizes 224 --workers 1 4 --bs 16 --batches 8 --fast_decode both --upscale 3072 \
    2>&1 | tee "$LOG/loader.txt"
stamp done
