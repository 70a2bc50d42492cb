"""Turn a pretraining run into the teaching weights shipped in `data/weights/`: the model's state dict in fp16
safetensors (no optimizer, no random states), with the recipe and the run's command as metadata.

    python tools/teaching_weights.py runs/teach_fast data/weights/fastconvmae_convvit_tiny_patch16.imagenette_96px.safetensors

The run's `log.csv` is copied beside the weights (same stem, `.log.csv`), so the file says how it was trained. The
command is read from `RUN.cmd` beside the run folder (`runs/teach_fast.cmd`) when it exists. Refuses to overwrite.
"""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from fastconvmae.pretrain import load_checkpoint

def main(run, dest):
    run, dest = Path(run), Path(dest)
    if dest.exists(): sys.exit(f"error: {dest} exists (remove it first)")
    ck = load_checkpoint(run / 'checkpoint-latest.pth')
    sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in ck['model'].items()}
    cmd = run.with_suffix('.cmd')
    meta = {'recipe': json.dumps(ck.get('recipe') or {}), 'epochs_trained': str(ck['epoch'] + 1),
            'command': cmd.read_text().strip() if cmd.exists() else '', 'dtype': 'float16 (trained in bf16 autocast, fp32 master weights)'}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dest), metadata=meta)
    shutil.copy(run / 'log.csv', dest.with_suffix('.log.csv'))
    print(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, {len(sd)} tensors, {ck['epoch'] + 1} epochs; {meta['command']}")

if __name__ == '__main__': main(*sys.argv[1:])
