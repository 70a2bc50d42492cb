"""The masked depthwise convolution of a Fast ConvMAE step: the batched K-view PyTorch version against the view-aware kernel.

Forward + input, weight and bias gradients, bf16 maps under CPU autocast (as in a bf16 training step), four
complementary views; median of `--reps` calls after one warm-up, per shape (batch, map side, channels, token side).

    python benchmarks/dwconv.py
"""
import argparse, time
import torch
import torch.nn as nn
from fastconvmae import maskconv
from fastconvmae.maskconv import masked_dwconv, view_dwconv, view_ids, dw_kernel
from fastconvmae.masking import random_masking, upsample_mask

#: (batch, map side, channels, stage-1/2 cells per token side, where it occurs)
SHAPES = [(64, 24, 64, 4, 'cpu preset, stage 1'), (64, 12, 96, 2, 'cpu preset, stage 2'),
          (32, 56, 64, 4, 'tiny widths at 224 px, batch 32, stage 1'), (32, 28, 96, 2, 'tiny widths at 224 px, batch 32, stage 2'),
          (4, 56, 256, 4, 'Fast ConvMAE-B, batch 4, stage 1'), (4, 28, 384, 2, 'Fast ConvMAE-B, batch 4, stage 2')]


def median_ms(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=10)
    p.add_argument('--views', type=int, default=4)
    a = p.parse_args()
    if dw_kernel() is None: raise SystemExit('error: the kernel could not be built here (see the warning above)')
    torch.manual_seed(0)
    K = a.views
    print(f'{K} views, bf16 maps, {torch.get_num_threads()} threads, torch {torch.__version__}\n')
    print('| where | map [B, H, W, C] | batched PyTorch (ms) | view-aware kernel (ms) | speed-up |\n|---|---|---|---|---|')
    for B, H, C, s, where in SHAPES:
        g = H // s
        m = random_masking(B, g * g, 1 - 1 / K, K)
        vis = upsample_mask(1 - m.mask.float(), (g, g), s)[..., None]
        conv = nn.Conv2d(C, C, 5, padding=2, groups=C)
        x = torch.randn(B, H, H, C).bfloat16().requires_grad_()
        gr = torch.randn(B, H, H, C).bfloat16()
        def batched():
            k, maskconv._BUILT['fastconvmae_dwconv'] = maskconv._BUILT['fastconvmae_dwconv'], None  # no kernel: the batched road
            try:
                with torch.autocast('cpu', dtype=torch.bfloat16): y = masked_dwconv(conv, x, vis)
                y.backward(gr.to(y.dtype))
            finally: maskconv._BUILT['fastconvmae_dwconv'] = k
        def kernel():
            with torch.autocast('cpu', dtype=torch.bfloat16): y = view_dwconv(conv, x, view_ids(vis))
            y.backward(gr)
        t0, t1 = median_ms(batched, a.reps), median_ms(kernel, a.reps)
        print(f'| {where} | [{B}, {H}, {H}, {C}] | {t0:.1f} | {t1:.1f} | {t0 / t1:.1f}x |', flush=True)
    print('\nNo mask (fine-tuning, detection, segmentation): oneDNN (fp32 channels-last, as `masked_dwconv(conv, x)`) against '
          'the kernel with one view everywhere\n')
    print('| map [B, H, W, C] | oneDNN (ms) | kernel (ms) | speed-up |\n|---|---|---|---|')
    for B, H, C in ((64, 16, 64), (64, 24, 64), (64, 12, 96), (32, 56, 256)):
        conv = nn.Conv2d(C, C, 5, padding=2, groups=C)
        x = torch.randn(B, H, H, C).bfloat16().requires_grad_()
        gr = torch.randn(B, H, H, C).bfloat16()
        zeros = torch.zeros(B, H, H, dtype=torch.int8)
        def onednn():
            k, maskconv._BUILT['fastconvmae_dwconv'] = maskconv._BUILT['fastconvmae_dwconv'], None
            try:
                with torch.autocast('cpu', dtype=torch.bfloat16): y = masked_dwconv(conv, x)
                y.backward(gr.to(y.dtype))
            finally: maskconv._BUILT['fastconvmae_dwconv'] = k
        def kernel():
            with torch.autocast('cpu', dtype=torch.bfloat16): y = view_dwconv(conv, x, zeros)
            y.backward(gr)
        t0, t1 = median_ms(onednn, a.reps), median_ms(kernel, a.reps)
        print(f'| [{B}, {H}, {H}, {C}] | {t0:.1f} | {t1:.1f} | {t0 / t1:.1f}x |', flush=True)


if __name__ == '__main__':
    main()
