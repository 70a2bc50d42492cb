"""What each Mixture-of-Reconstructors target costs: img/s of one pretraining step with targets on and off.

A step is forward + backward + AdamW step (+ the EMA update when the EMA target is on), under bf16
autocast (or fp32). DINO and CLIP teachers are the real ViT-B/16 timm architectures with RANDOM
weights (same FLOPs as the real ones; nothing is downloaded). Configurations are timed in interleaved
rounds so that they all see the same machine state; the best round is reported, with the median.

    python benchmarks/mor_cost.py --arch fastconvmae_convvit_tiny_patch16 --img_size 224 --bs 8
    python benchmarks/mor_cost.py --arch fastconvmae_convvit_base_patch16 --img_size 224 --bs 2 --steps 2 --rounds 1
"""
import argparse, os, statistics, time, platform
from dataclasses import replace
import torch
from fastconvmae.mor import MOR_PRESETS, TEACHERS, mor_model, timm_teacher

CONFIGS = 'pixel;pixel,ema;pixel,dino;pixel,clip;pixel,ema,dino,clip'


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def make_step(model, opt, imgs, precision, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            loss, _, _ = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if 'ema' in model.targets: model.update_ema(0.999)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='fastconvmae_convvit_tiny_patch16')
    p.add_argument('--img_size', type=int, default=224)
    p.add_argument('--bs', type=int, default=8)
    p.add_argument('--configs', default=CONFIGS, help='";"-separated target lists')
    p.add_argument('--precision', default='bf16', choices=['bf16', 'fp32'])
    p.add_argument('--steps', type=int, default=3, help='timed steps per configuration and round')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps per configuration (first round only)')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    configs = [tuple(c.split(',')) for c in a.configs.split(';')]
    needed = {t for c in configs for t in c if t in TEACHERS}
    teachers = {t: timm_teacher(TEACHERS[t], random_init=True) for t in sorted(needed)}  # ViT-B/16, random weights
    recipe = replace(MOR_PRESETS['cpu_mor'], arch=a.arch, img_size=a.img_size)
    runs = {}
    for c in configs:
        torch.manual_seed(0)
        m = mor_model(replace(recipe, targets=c), {t: teachers[t] for t in c if t in teachers}).to(device).train()
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4, betas=(0.9, 0.95), foreach=True)
        imgs = torch.randn(a.bs, 3, a.img_size, a.img_size, device=device)
        runs[c] = make_step(m, opt, imgs, a.precision, device)
    load0 = os.getloadavg()[0]
    print(f'{a.arch} at {a.img_size} px, batch {a.bs}, {a.precision} on {device} ({platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads); teachers: ViT-B/16 random weights; load average at start {load0:.1f}')
    times = {c: [] for c in configs}
    for r in range(a.rounds):
        for c, step in runs.items():
            if r == 0:
                for _ in range(a.warmup): step()
            sync(device); t = time.perf_counter()
            for _ in range(a.steps): step()
            sync(device)
            times[c].append((time.perf_counter() - t) / a.steps)
    print(f'load average at end {os.getloadavg()[0]:.1f}\n')
    base = min(times[configs[0]])
    print('| targets | img/s (best round) | img/s (median) | s/step | time vs first |')
    print('|---|---|---|---|---|')
    for c in configs:
        best, med = min(times[c]), statistics.median(times[c])
        print(f"| {' + '.join(c)} | {a.bs / best:.1f} | {a.bs / med:.1f} | {best:.2f} | x{best / base:.2f} |")


if __name__ == '__main__':
    main()
