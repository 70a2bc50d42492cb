"""The runs behind `nbs/12_results.ipynb`: Fast ConvMAE vs ConvMAE vs no pretraining on Imagenette (96 px, ConvViT-T).

Every run is one named step; each writes its heavy files (checkpoints) under `runs/results/NAME/` and copies its small
logs (CSV, JSON lines) to `results/NAME/`, which is committed and read by the chapter. A step whose `results/NAME/DONE`
exists is skipped (nothing is ever overwritten: delete the folder to redo it).

    python tools/reproduce.py --list              # the steps and their exact commands
    python tools/reproduce.py fast_s0 ft_fast_s0  # some steps
    python tools/reproduce.py all                 # every step, in order (`make reproduce`)

Environment: DATA (default ../shared/data/imagenette-128), BIN (folder of the console scripts, default the running
Python's). The same commands run on a GPU (drop nothing; the recipes pick the device).
"""
import os, sys, json, shutil, subprocess, time, platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get('DATA', str(ROOT.parent / 'shared' / 'data' / 'imagenette-128'))
BIN = Path(os.environ.get('BIN', Path(sys.executable).parent))
RUNS, RESULTS = ROOT / 'runs' / 'results', ROOT / 'results'
EPOCHS = 10          # the `cpu` pretraining preset's schedule, the same for every arm
IMG = 96             # the `cpu` preset's resolution: a 6 x 6 token grid, 9 visible tokens per view at mask ratio 0.75

ARCH = dict(fast='fastconvmae_convvit_tiny_patch16', convmae='convmae_convvit_tiny_patch16', mor='fastconvmae_convvit_tiny_patch16')


def pretrain(arm: str, seed: int, epochs: int = EPOCHS, extra=()):
    return [BIN / 'fastconvmae', 'pretrain', DATA, '--preset', 'cpu', '--model', ARCH[arm], '--img_size', IMG,
            '--epochs', epochs, '--seed', seed, '--knn_every', 1, '--output', RUNS / f'{arm}_s{seed}', *extra]


def ckpt(name: str): return RUNS / name / 'checkpoint-latest.pth'


def finetune(name: str, seed: int):
    "The `cpu` fine-tuning recipe (5 epochs, RandAugment, Mixup/CutMix, layer decay) at the pretraining resolution."
    src = [] if name.startswith('scratch') else ['--pretrained', ckpt(name)]
    return [BIN / 'fastconvmae', 'finetune', DATA, '--preset', 'cpu', '--img_size', IMG, '--seed', seed, *src,
            '--output', RUNS / name / 'finetune']


def linprobe(name: str, seed: int):
    "The quick linear probe: frozen pooled features, an L2-regularised logistic regression."
    src = [] if name.startswith('scratch') else ['--pretrained', ckpt(name)]
    return [BIN / 'fastconvmae', 'linprobe', DATA, '--quick', '--model', 'convvit_tiny_patch16', '--img_size', IMG, '--seed', seed, *src]


def knn():
    "k-NN of a randomly initialised encoder (the pretrained runs log theirs every epoch)."
    return [BIN / 'fastconvmae', 'knn', DATA, '--model', 'convvit_tiny_patch16', '--img_size', IMG]


def steps():
    "name -> (command, [(run file, results file)], file for the last stdout line or None), in the order `all` runs them."
    s = {}
    for seed in (0, 1):
        for arm in ('fast', 'convmae'):
            s[f'{arm}_s{seed}'] = (pretrain(arm, seed), [('log.csv', 'pretrain.csv')], None)
        s[f'scratch_s{seed}'] = None  # downstream only
        for name in (f'fast_s{seed}', f'convmae_s{seed}', f'scratch_s{seed}'):
            s[f'ft_{name}'] = (finetune(name, seed), [('finetune/history.csv', 'finetune.csv')], 'finetune.jsonl')
            s[f'lp_{name}'] = (linprobe(name, seed), [], 'linprobe.jsonl')
        if seed == 0:  # one random encoder: fastconvmae_knn's random init starts from PyTorch's fixed RNG state, a second step would repeat it
            s['knn_scratch_s0'] = (knn(), [], 'knn.jsonl')
    s['mor_s0'] = (pretrain('mor', 0, extra=['--targets', 'pixel,ema']), [('log.csv', 'pretrain.csv')], None)
    s['ft_mor_s0'], s['lp_mor_s0'] = (finetune('mor_s0', 0), [('finetune/history.csv', 'finetune.csv')], 'finetune.jsonl'), (linprobe('mor_s0', 0), [], 'linprobe.jsonl')
    return {k: v for k, v in s.items() if v is not None}


def folder(step: str) -> str:
    "The run a step belongs to: `ft_fast_s0` -> `fast_s0`."
    return step.split('_', 1)[1] if step.split('_')[0] in ('ft', 'lp', 'knn') else step


def shown(cmd) -> str:
    "A command as a reader would type it: console-script names, paths relative to the repository, $DATA."
    return ' '.join(Path(c).name if c.startswith(str(BIN)) else c.replace(str(ROOT) + '/', '').replace(DATA, '$DATA') for c in map(str, cmd))


def code_commit() -> str:
    "The git revision of the `fastconvmae` package the runs import (it may be a pinned worktree on PYTHONPATH)."
    import fastconvmae
    d = Path(fastconvmae.__file__).parent
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=d, capture_output=True, text=True).stdout.strip()


def run(step: str, cmd, keep, stdout_name):
    out = RESULTS / folder(step)
    done = out / f'DONE.{step}'
    if done.exists(): print(f'{step}: done already ({done.relative_to(ROOT)}), skipped'); return
    cmd = [str(c) for c in cmd]
    out.mkdir(parents=True, exist_ok=True); (RUNS / folder(step)).mkdir(parents=True, exist_ok=True)
    print(f'{step}: {shown(cmd)}', flush=True)
    if '--output' in cmd or '--output_dir' in cmd:  # a half-finished earlier attempt: continue it exactly
        i = cmd.index('--output') if '--output' in cmd else cmd.index('--output_dir')
        last = Path(cmd[i + 1]) / 'checkpoint-latest.pth'
        if last.exists(): cmd += ['--resume', str(last)]
        elif Path(cmd[i + 1]).is_dir() and any(Path(cmd[i + 1]).iterdir()):
            cmd += ['--overwrite']  # an attempt that died before its first checkpoint left only logs
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    sys.stdout.write(p.stdout)
    if p.returncode: raise SystemExit(f'error: {step} failed (exit {p.returncode})')
    run_dir = RUNS / folder(step)
    for src, dst in keep: shutil.copy(run_dir / src, out / dst)
    if stdout_name: (out / stdout_name).write_text(p.stdout.strip().splitlines()[-1] + '\n')
    meta = dict(step=step, command=shown(cmd),
                wall_s=round(time.time() - t0, 1), machine=f'{platform.machine()} {os.cpu_count()} cores',
                commit=code_commit(),
                finished=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    done.write_text(json.dumps(meta) + '\n')
    print(f'{step}: finished in {meta["wall_s"]:.0f} s', flush=True)


def main(argv):
    s = steps()
    if not argv or argv == ['--list']:
        for k, (cmd, _, _) in s.items(): print(f'{k}: {shown(cmd)}')
        return
    names = list(s) if argv == ['all'] else argv
    bad = [n for n in names if n not in s]
    if bad: raise SystemExit(f'error: unknown step(s) {", ".join(bad)}; see --list')
    for n in names: run(n, *s[n])


if __name__ == '__main__':
    main(sys.argv[1:])
