"""Throughput of the pretraining loader (`fastconvmae.data.pretrain_dls(...).train`): decode + augmentation + collation.

Prints a markdown table of images/s, in total and per loading process (the main process when `num_workers=0`).
Each configuration runs `--repeats` times (best kept: the machine may be shared), `--batches` batches after one warm-up batch.

    .venv/bin/python benchmarks/data_loader.py --path ../shared/data/imagenette-128 --sizes 128 224 --workers 0 1 --batches 20
    # full-size JPEGs (balloon's photos: up to 2,048 px), with and without reduced decoding
    .venv/bin/python benchmarks/data_loader.py --path ../shared/data/balloon/train --sizes 224 --workers 1 --bs 16 --fast_decode both
    # the same photos re-saved at a camera's size (longer side 3,072 px, JPEG quality 90) in a temporary folder
    .venv/bin/python benchmarks/data_loader.py --path ../shared/data/balloon/train --sizes 224 --workers 1 --bs 16 --fast_decode both --upscale 3072
"""
import argparse, tempfile, time, warnings
from pathlib import Path
import torch
from fastconvmae.data import pretrain_dls

def batches(dl):
    "Endless batches of `dl`, epoch after epoch"
    while True: yield from dl

def bench(path, size:int, workers:int, bs:int, n_batches:int, fast_decode:bool=False) -> float:
    "Images/s of `n_batches` training batches, timed after one warm-up batch"
    dl = pretrain_dls(path, img_size=size, bs=bs, num_workers=workers, valid=1, device='cpu', fast_decode=fast_decode).train
    it = batches(dl)
    next(it)  # warm-up: worker start-up, file cache
    t, n = time.perf_counter(), 0
    for _ in range(n_batches): n += len(next(it)[0])
    dt = time.perf_counter() - t
    it.close()
    return n/dt

def upscaled(path, side:int) -> str:
    "A temporary folder with the JPEG/PNG images of `path` resized (bicubic) to a longer side of `side` px, saved as JPEG q90"
    from PIL import Image
    from fastconvmae.data import find_images
    out = Path(tempfile.mkdtemp(prefix='loader-bench-'))
    for i, f in enumerate(find_images(Path(path))[0]):
        im = Image.open(f).convert('RGB'); s = side / max(im.size)
        im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.BICUBIC).save(out / f'{i:05d}.jpg', quality=90)
    return str(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--path', default='../shared/data/imagenette-128', help='dataset root (with train/) or image folder')
    p.add_argument('--sizes', type=int, nargs='+', default=[128, 224])
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1])
    p.add_argument('--bs', type=int, default=64)
    p.add_argument('--batches', type=int, default=20)
    p.add_argument('--repeats', type=int, default=2)
    p.add_argument('--threads', type=int, default=1, help='torch threads of the main process (workers always use 1)')
    p.add_argument('--upscale', type=int, default=0, help='first re-save the images with this longer side (JPEG q90, temporary folder)')
    p.add_argument('--fast_decode', default='no', choices=['no', 'yes', 'both'], help='reduced JPEG decoding (pretrain_dls fast_decode)')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore', category=FutureWarning)
    if a.upscale: a.path = upscaled(a.path, a.upscale)
    print(f"path={a.path} bs={a.bs} batches={a.batches} repeats={a.repeats} torch threads={a.threads}\n")
    print("| img_size | fast_decode | num_workers | img/s (total) | img/s per process | ms/img per process |\n|---|---|---|---|---|---|")
    for size in a.sizes:
        for fd in {'no': [False], 'yes': [True], 'both': [False, True]}[a.fast_decode]:
            for w in a.workers:
                ips = max(bench(a.path, size, w, a.bs, a.batches, fd) for _ in range(a.repeats))
                per = ips/max(w, 1)
                print(f"| {size} | {'yes' if fd else 'no'} | {w} | {ips:.0f} | {per:.0f} | {1000/per:.2f} |", flush=True)

if __name__ == '__main__': main()
