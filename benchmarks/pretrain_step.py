"""Time one pretraining step (forward + backward + AdamW step) of a fastconvmae model.

Prints img/s, achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) and that as a
fraction of this machine's matmul peak, measured in the same run, for fp32 and bf16 autocast.

    python benchmarks/pretrain_step.py --arch fastconvmae_convvit_base_patch16 --bs 4 --img_size 224
    python benchmarks/pretrain_step.py --arch fastconvmae_convvit_base_patch16 --bs 64 --device cuda --precision bf16

With --official_dir DIR (a checkout of Alpha-VL/FastConvMAE, not part of this repo), the official
`fastconvmae_convvit_base_patch16` is timed in the same run, interleaved with ours, so that both see
the same machine state.
"""
import argparse, time, platform
import torch
from torch.utils.flop_counter import FlopCounterMode
from fastconvmae.models import create_model


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def matmul_peak(dtype, device, n=2048, reps=10):
    "Best-of-reps GFLOP/s of an n x n x n matmul: the machine's practical peak for this dtype."
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2): a @ b
    best = float('inf')
    for _ in range(reps):
        sync(device); t = time.perf_counter(); a @ b; sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def step_fn(model, opt, imgs, precision, device, mask_ratio):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def load_official(path, arch):
    "The official model factory `arch` from a checkout of Alpha-VL/FastConvMAE (or ConvMAE) at `path`."
    import sys, importlib
    sys.path.insert(0, str(path))
    mod = importlib.import_module('models_fastconvmae' if arch.startswith('fast') else 'models_convmae')
    return getattr(mod, arch)


def time_steps(step, steps, device):
    sync(device); t = time.perf_counter()
    for _ in range(steps): step()
    sync(device)
    return (time.perf_counter() - t) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='fastconvmae_convvit_base_patch16')
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--precision', default='fp32,bf16', help='comma-separated: fp32, bf16')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--official_dir', default=None, help='checkout of the official code to time alongside (224 px only)')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    models = {'fastconvmae': create_model(a.arch, img_size=a.img_size, norm_pix_loss=True).to(device)}
    if a.official_dir:
        models['official'] = load_official(a.official_dir, a.arch)(norm_pix_loss=True).to(device)
    imgs = torch.randn(a.bs, 3, a.img_size, a.img_size, device=device)
    print(f'{a.arch} img {a.img_size} batch {a.bs} mask {a.mask_ratio} on {device} '
          f'({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})')
    opts, flops = {}, {}
    for name, model in models.items():
        opt_kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        try: opts[name] = torch.optim.AdamW(model.parameters(), fused=True, **opt_kw)
        except (RuntimeError, TypeError): opts[name] = torch.optim.AdamW(model.parameters(), foreach=True, **opt_kw)
        with FlopCounterMode(display=False) as fc:
            loss, _, _ = model(imgs, mask_ratio=a.mask_ratio); loss.backward()
        opts[name].zero_grad(set_to_none=True)
        flops[name] = fc.get_total_flops()
        print(f'{name}: fwd+bwd FLOPs per step {flops[name] / 1e9:.1f} G ({flops[name] / a.bs / 1e9:.1f} G per image)')
    for prec in a.precision.split(','):
        peak = matmul_peak(torch.float32 if prec == 'fp32' else torch.bfloat16, device)
        steps = {n: step_fn(m, opts[n], imgs, prec, device, a.mask_ratio) for n, m in models.items()}
        for n in models:
            for _ in range(a.warmup): steps[n]()
        times = {n: [] for n in models}
        for _ in range(a.steps):  # interleaved, one step each, so both see the same machine state
            for n in models: times[n].append(time_steps(steps[n], 1, device))
        for n in models:
            dt = sorted(times[n])[len(times[n]) // 2]  # median step
            achieved = flops['fastconvmae'] / dt / 1e9  # the same useful work for both
            print(f'{n:>12} {prec:>5}: {dt:7.3f} s/step  {a.bs / dt:8.2f} img/s  {achieved:8.1f} GFLOP/s  '
                  f'= {achieved / peak:5.1%} of the {prec} matmul peak ({peak:.0f} GFLOP/s)')
        if len(models) > 1:
            med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
            print(f'{"speed-up":>12} {prec:>5}: {med["official"] / med["fastconvmae"]:.2f}x')

if __name__ == '__main__':
    main()
