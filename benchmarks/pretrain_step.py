"""Time one pretraining step (forward + backward + AdamW step) of fastconvmae, side by side with the official code.

For each precision (fp32, bf16 autocast) every model takes one step in turn, `--steps` rounds, so that all of them see
the same machine state; the median step is reported as img/s, achieved GFLOP/s (FLOPs counted once by
`torch.utils.flop_counter` on this package's model, the same useful work for every code) and model FLOP utilisation
against the dtype's matmul peak measured in the same run (and against `--peak_tflops`, a device's datasheet peak).

    # the two configurations of the speed issue, with the official code and this package's previous revision
    python benchmarks/pretrain_step.py --config base --bs 4 --official_dir ../FastConvMAE --rev 2900a1c
    python benchmarks/pretrain_step.py --config tiny224 --bs 32 --official_dir ../FastConvMAE --rev 2900a1c
    # the CPU preset (96 px: the official code only runs at 224 px)
    python benchmarks/pretrain_step.py --config preset --bs 64 --rev 2900a1c
    # a GPU: eager and compiled, bf16, against the H100/H200 dense bf16 peak
    python benchmarks/pretrain_step.py --config base --bs 128 --device cuda --precision bf16 --compile both --peak_tflops 989

`--official_dir` is a checkout of Alpha-VL/FastConvMAE (kept outside this repo); `--rev` builds the models of this
package at a git revision (extracted to a temporary folder and imported under another name), so a speed-up over an
earlier version is measured in the same run, not against a remembered figure.
"""
import argparse, importlib, importlib.util, platform, subprocess, sys, tempfile, time, warnings
from functools import partial
from pathlib import Path
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fastconvmae.models import MaskedAutoencoderConvViT, flop_counter  # noqa: E402  (the package's FLOP counter, fixed for depthwise convs and CPU attention)

#: model configurations: this package's constructor arguments (the official class takes the same ones)
CONFIGS = dict(
    base=dict(img_size=224, embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12, decoder_embed_dim=512, decoder_depth=8,
              decoder_num_heads=16),
    tiny224=dict(img_size=224, embed_dim=(64, 96, 192), depth=(1, 1, 6), num_heads=3, decoder_embed_dim=128, decoder_depth=8,
                 decoder_num_heads=4),
    preset=dict(img_size=96, embed_dim=(64, 96, 192), depth=(1, 1, 6), num_heads=3, decoder_embed_dim=128, decoder_depth=2,
                decoder_num_heads=4),  # fastconvmae_convvit_tiny_patch16 at 96 px: the `cpu` pretraining preset
)


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def matmul_peak(dtype, device, n=None, reps=10):
    "Best-of-reps GFLOP/s of an n x n x n matmul (n = 2048 on a CPU, 8192 on a GPU): the machine's practical peak for this dtype."
    n = n or (8192 if device.type == 'cuda' else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2): a @ b
    best = float('inf')
    for _ in range(reps):
        sync(device); t = time.perf_counter(); a @ b; sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def official_model(path, cfg, complementary=True):
    "The official `MaskedAutoencoderViT` of a checkout of Alpha-VL/FastConvMAE (or ConvMAE) built with `cfg`."
    import contextlib, io, numpy as np
    if not hasattr(np, 'float'): np.float = float  # the official pos_embed.py predates NumPy 1.24 (np.float removed)
    sys.path.insert(0, str(path))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its imports print and warn (timm registry)
        warnings.simplefilter('ignore')
        mod = importlib.import_module('models_fastconvmae' if complementary else 'models_convmae')
    if cfg['img_size'] != 224: raise SystemExit('error: the official code runs at 224 px only (its masks are hard-coded 14 x 14)')
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k != 'img_size'}
    return mod.MaskedAutoencoderViT(img_size=[224, 56, 28], patch_size=[4, 2, 2], mlp_ratio=[4, 4, 4],
                                    norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True, **kw)


def package_at(rev: str):
    "This package's `models` module at git revision `rev`, imported as `fastconvmae_<rev>`."
    d = Path(tempfile.mkdtemp(prefix=f'fastconvmae-{rev}-'))
    arch = subprocess.run(['git', 'archive', rev, 'fastconvmae'], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', str(d)], input=arch, check=True)
    name = f'fastconvmae_{rev}'
    spec = importlib.util.spec_from_file_location(name, d / 'fastconvmae' / '__init__.py',
                                                  submodule_search_locations=[str(d / 'fastconvmae')])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm: the revision registers the same model names again
        mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
        return importlib.import_module(f'{name}.models')


def step_fn(model, opt, imgs, precision, device, mask_ratio):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def adamw(model):
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    try: return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError): return torch.optim.AdamW(model.parameters(), foreach=True, **kw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', default='base', choices=list(CONFIGS), help='model configuration')
    p.add_argument('--convmae', action='store_true', help='ConvMAE (one view) instead of Fast ConvMAE')
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--precision', default='fp32,bf16', help='comma-separated: fp32, bf16')
    p.add_argument('--steps', type=int, default=5, help='timed rounds (median reported)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--official_dir', default=None, help='checkout of the official code to time alongside (224 px only)')
    p.add_argument('--rev', nargs='*', default=[], help='git revisions of this package to time alongside')
    p.add_argument('--compile', default='no', choices=['no', 'yes', 'both'], help='torch.compile this package\'s model')
    p.add_argument('--channels_last', action='store_true', help='channels-last weights (the CUDA default of the pretraining command)')
    p.add_argument('--peak_tflops', type=float, default=None, help='datasheet bf16 peak of the device, for MFU (H100/H200 SXM: 989)')
    return p


def main():
    a = parser().parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = CONFIGS[a.config]
    torch.manual_seed(0)
    ours = MaskedAutoencoderConvViT(**cfg, norm_pix_loss=True, complementary=not a.convmae)
    sd = ours.state_dict()
    models = {'fastconvmae': ours}
    if a.compile == 'both': models['fastconvmae+compile'] = MaskedAutoencoderConvViT(**cfg, norm_pix_loss=True, complementary=not a.convmae)
    for rev in a.rev:
        models[f'rev {rev}'] = package_at(rev).MaskedAutoencoderConvViT(**cfg, norm_pix_loss=True, complementary=not a.convmae)
    if a.official_dir: models['official'] = official_model(a.official_dir, cfg, not a.convmae)
    for n, m in models.items():
        missing, unexpected = m.load_state_dict(sd, strict=False)  # the same weights everywhere (the official names are ours)
        if missing or unexpected: print(f'{n}: {len(missing)} missing / {len(unexpected)} unexpected weight names')
        m.to(device)
        if a.channels_last: m.to(memory_format=torch.channels_last)
    if a.compile in ('yes', 'both'):
        key = 'fastconvmae' if a.compile == 'yes' else 'fastconvmae+compile'
        models[key] = torch.compile(models[key])
    imgs = torch.randn(a.bs, 3, cfg['img_size'], cfg['img_size'], device=device)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or platform.machine())
    print(f"{'ConvMAE' if a.convmae else 'Fast ConvMAE'} '{a.config}' {cfg}; batch {a.bs}, mask {a.mask_ratio}, on {device} "
          f"({dev_name}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    with flop_counter() as fc:
        loss, _, _ = ours(imgs, mask_ratio=a.mask_ratio); loss.backward()
    ours.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    print(f'fwd+bwd FLOPs per step {flops / 1e9:.1f} G ({flops / a.bs / 1e9:.2f} G per image; the C++ kernels of the CPU '
          f'path are not counted: the same useful work for every code)')
    opts = {n: adamw(m) for n, m in models.items()}
    print('\n| code | precision | s/step | img/s | GFLOP/s | MFU (measured matmul peak) |' + (' MFU (datasheet) |' if a.peak_tflops else '')
          + '\n|---|---|---|---|---|---|' + ('---|' if a.peak_tflops else ''))
    ratios = []
    for prec in a.precision.split(','):
        peak = matmul_peak(torch.float32 if prec == 'fp32' else torch.bfloat16, device)
        steps = {n: step_fn(m, opts[n], imgs, prec, device, a.mask_ratio) for n, m in models.items()}
        for n in models:
            for _ in range(a.warmup): steps[n]()
        times = {n: [] for n in models}
        for _ in range(a.steps):  # interleaved, one step each, so all see the same machine state
            for n in models:
                sync(device); t = time.perf_counter(); steps[n](); sync(device)
                times[n].append(time.perf_counter() - t)
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        for n in models:
            achieved = flops / med[n] / 1e9
            row = (f'| {n} | {prec} | {med[n]:.3f} | {a.bs / med[n]:.2f} | {achieved:.0f} | {achieved / peak:.1%} of {peak:.0f} |'
                   + (f' {achieved / 1e3 / a.peak_tflops:.1%} of {a.peak_tflops:.0f} T |' if a.peak_tflops else ''))
            print(row, flush=True)
        ratios += [f'{prec}: fastconvmae is {med[n] / med["fastconvmae"]:.2f}x as fast as {n}' for n in models if n != 'fastconvmae']
    print('\n' + '\n'.join(ratios))


if __name__ == '__main__':
    main()
