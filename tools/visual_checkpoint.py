"""Pretrain a small raw-pixel Fast ConvMAE-T on Imagenette for the figures of the pretraining and visualisation chapters.

The model predicts plain (ImageNet-normalised) pixels (`norm_pix_loss=False`), so its reconstructions can be shown as
they are, without borrowing any statistic of the hidden patches. After every epoch it reconstructs the same fixed
validation images with the same fixed mask. The run behind the committed figures (shared 2-core CPU, 2026-11-29):

    flock /tmp/fcm-train.lock env OMP_NUM_THREADS=2 .venv/bin/python tools/visual_checkpoint.py \
        --data ../shared/data/imagenette-128 --output ../runs/visual --images nbs/images --minutes 14

Its speed probe chose 4832 training images per epoch (add `--n_train 4832` to repeat it exactly): Fast ConvMAE-T,
96 px, batch 32, lr 5e-4, bf16, 10 epochs, 40.4 minutes (the machine was shared: epochs took 1 to 10 minutes).
Mean per-batch train loss 1.441 (epoch 0) -> 0.694 (epoch 9); validation (64 images, random masks) 0.954 -> 0.677;
the four fixed images under their fixed mask 1.447 (untrained) -> 0.881.

Writes to `--output`:
- `fastconvmae_tiny_rgb_visual.pth`: a release-style checkpoint, `{'model': state_dict, 'config': {...}, ...}`
  (fp32, ~15 MB; the figures of the pretraining chapter come from this run; the visualisation chapter now uses the
  teaching weights shipped in `data/weights/`, see `data/weights/README.md`);
- `history.pt`: per-epoch reconstructions (uint8) of the fixed images and the losses; `log.csv`;
and to `--images` (if given) `visual_run_grid.png` (rows = epochs; per image: masked input, reconstruction, original)
and `visual_run_loss.png`.
"""
from __future__ import annotations
import math, sys, time
from dataclasses import replace, asdict
from pathlib import Path
import torch
from fastcore.script import call_parse
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback

from fastconvmae.data import pretrain_dls, denormalize
from fastconvmae.models import reconstruct
from fastconvmae.pretrain import PRESETS, pretrain_learner, fit_pretrain, atomic_save, unwrap

CKPT_NAME = 'fastconvmae_tiny_rgb_visual.pth'

def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    "ImageNet-normalised [..., 3, H, W] -> uint8 RGB."
    return (denormalize(x.float().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)

class ReconstructionHistory(Callback):
    "Keep, before training and after each epoch, the reconstructions of `n` fixed validation images under one fixed mask."
    order = 97
    def __init__(self, n: int=4, seed: int=0): self.n, self.seed = n, seed

    def before_fit(self):
        xb = self.dls.valid.one_batch()[0]
        self.imgs = xb[::max(1, len(xb) // self.n)][:self.n]  # spread over the classes
        m = unwrap(self.model)
        h, w = m.check_input(self.imgs)
        self.noise = torch.rand(self.imgs.shape[0], h * w, generator=torch.Generator().manual_seed(self.seed))
        self.frames, self.epoch_loss, self.fixed_loss, self.t0 = [self.snap()], [], [], time.time()
        self.fixed_loss.append(self.loss_fixed())

    @torch.no_grad()
    def loss_fixed(self) -> float:
        m = unwrap(self.model); tr = m.training; m.eval()
        try: return float(m(self.imgs, noise=self.noise)[0])
        finally: m.train(tr)

    def snap(self) -> torch.Tensor:
        "[3, n, 3, H, W] uint8: view 0's masked input, reconstruction (visible pasted) and the original."
        m = unwrap(self.model); tr = m.training; m.eval()
        try: masked, rec, pasted = reconstruct(m, self.imgs, noise=self.noise)
        finally: m.train(tr)
        return torch.stack([_to_uint8(masked[0]), _to_uint8(pasted[0]), _to_uint8(self.imgs)])

    def after_epoch(self):
        self.frames.append(self.snap())
        self.fixed_loss.append(self.loss_fixed())
        n = len(self.dls.train)
        self.epoch_loss.append(float(torch.stack(self.recorder.losses[-n:]).float().mean()))
        print(f"epoch {self.epoch}: train loss {self.epoch_loss[-1]:.4f}, fixed-image loss {self.fixed_loss[-1]:.4f}, "
              f"{(time.time() - self.t0) / 60:.1f} min", flush=True)

def grid_figure(frames: torch.Tensor, epochs: list[int], losses: list[float], thumb: int=80):
    "Mosaic: one row per chosen epoch; per image the masked input, the reconstruction and the original."
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    E, _, n, C, H, W = frames.shape
    G = 12  # pixels between images
    rows = []
    for e in epochs:
        f = F.interpolate(frames[e].flatten(0, 1).float(), size=(thumb, thumb), mode='area')  # [3 n, C, t, t]
        f = f.view(3, n, C, thumb, thumb).permute(1, 0, 2, 3, 4).flatten(0, 1)                 # image-major
        pad = torch.full((3 * n, C, thumb + 4, thumb + 4), 255.); pad[:, :, 2:-2, 2:-2] = f
        gap = torch.full((C, thumb + 4, G), 255.)
        cols = [t for i in range(n) for t in [*pad[3 * i:3 * i + 3]] + ([gap] if i < n - 1 else [])]
        rows.append(torch.cat(cols, dim=2))               # [C, t+4, 3n (t+4) + (n-1) G]: a gap between images
    mosaic = torch.cat(rows, dim=1).permute(1, 2, 0).byte().numpy()
    dpi = 100
    hpx, wpx = mosaic.shape[:2]
    fig = plt.figure(figsize=((wpx + 110) / dpi, (hpx + 40) / dpi), dpi=dpi)
    ax = fig.add_axes([100 / (wpx + 110), 0, wpx / (wpx + 110), hpx / (hpx + 40)])
    ax.imshow(mosaic, interpolation='nearest')
    ax.set_xticks([(3 * i + j + .5) * (thumb + 4) + i * G for i in range(n) for j in range(3)],
                  ['masked', 'reconstr.', 'original'] * n, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([(r + .5) * (thumb + 4) for r in range(len(epochs))],
                  [('untrained' if e == 0 else f'after {e} ep.') + f'\nloss {losses[e]:.3f}' for e in epochs], fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values(): s.set_visible(False)
    return fig

def save_png(fig, path: Path, colours: int=256):
    "Save a figure as a small palette PNG."
    import io
    from PIL import Image
    import matplotlib.pyplot as plt
    buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=fig.dpi); plt.close(fig)
    Image.open(buf).convert('RGB').quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)

def loss_figure(h: dict):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    it = torch.tensor(h['batch_loss'])
    k = max(1, len(it) // 100)
    sm = it[:len(it) // k * k].view(-1, k).mean(1)
    spe = h['iters_per_epoch']
    ax.plot((torch.arange(len(sm)) + .5) * k / spe, sm, lw=1, label=f'train (mean of {k} batches)')
    ax.plot(range(len(h['fixed_loss'])), h['fixed_loss'], 'o-', ms=3, label='the 4 fixed images, fixed mask')
    ax.set_xlabel('epoch'); ax.set_ylabel('MSE on hidden patches'); ax.grid(alpha=.3); ax.legend(fontsize=8)
    ax.set_title(f"raw-pixel Fast ConvMAE-T on Imagenette, {h['config']['img_size']} px", fontsize=9)
    fig.tight_layout()
    return fig

def make_images(history: Path, images: Path, rows: int=7):
    "The two committed PNGs from a `history.pt`."
    h = torch.load(history, weights_only=True)
    frames, E = h['frames'], h['frames'].shape[0] - 1
    picks = sorted(e for e in {0, 1, 2, E} | {round(E ** (i / (rows - 2))) for i in range(rows - 1)} if e <= E)  # log-spaced
    images.mkdir(parents=True, exist_ok=True)
    save_png(grid_figure(frames, picks, h['fixed_loss']), images / 'visual_run_grid.png')
    save_png(loss_figure(h), images / 'visual_run_loss.png', 64)
    return picks

def _speed_probe(r, steps: int=3) -> float:
    "Training images per second of a throw-away model with the recipe (random data, bf16 autocast on CPU)."
    from fastconvmae.models import create_model
    m = create_model(r.arch, img_size=r.img_size, norm_pix_loss=r.norm_pix_loss)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randn(r.bs, 3, r.img_size, r.img_size)
    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=r.precision == 'bf16'): loss = m(x)[0]
        loss.backward(); opt.step(); opt.zero_grad()
    step()
    t = time.time()
    for _ in range(steps): step()
    return steps * r.bs / (time.time() - t)

@call_parse
def main(data: str='../shared/data/imagenette-128', # image folder in the ImageNet layout
         output: str='../runs/visual', # checkpoint, history and log go here (the folder is this tool's own: overwritten)
         images: str=None, # also write the two figures here (e.g. nbs/images)
         epochs: int=10, # epochs (rows of the figure)
         n_train: int=None, # training images per epoch (an evenly spaced fixed subset); default: what fits `minutes`
         minutes: float=14., # training-time budget used to size `n_train` from a short speed probe
         img_size: int=96,
         bs: int=32,
         blr: float=4e-3, # base lr (lr = blr x bs / 256): higher than the CPU preset's, for a run of a few hundred steps
         n_show: int=4, # fixed validation images to reconstruct
         seed: int=0,
         figures_only: bool=False): # only redraw the PNGs from an existing history.pt
    "Pretrain the raw-pixel Fast ConvMAE-T used for the visualisation figures."
    out = Path(output)
    if figures_only:
        if not images: sys.exit('error: --figures_only needs --images')
        make_images(out / 'history.pt', Path(images)); return
    r = replace(PRESETS['cpu'], img_size=img_size, bs=bs, epochs=epochs, blr=blr, norm_pix_loss=False, warmup_epochs=1)
    if n_train is None:
        ips = _speed_probe(r)
        n_train = max(bs, int(ips * minutes * 60 / epochs * 0.85) // bs * bs)  # ~15 % for data, validation and figures
        print(f"speed probe: {ips:.1f} img/s -> {n_train} training images per epoch", flush=True)
    torch.manual_seed(seed)
    dls = pretrain_dls(data, img_size=img_size, bs=bs, num_workers=1, seed=seed, n_train=n_train, valid=64)
    out.mkdir(parents=True, exist_ok=True)
    for f in ['log.csv', 'history.pt', CKPT_NAME]: (out / f).unlink(missing_ok=True)
    hist = ReconstructionHistory(n_show, seed)
    learn = pretrain_learner(dls, r, output=out, save_every=0, figures=False, cbs=[hist])
    learn.remove_cb(ProgressCallback)
    print(f"pretraining {r.arch} (raw pixels) at {img_size} px, {len(dls.train.dataset)} images x {epochs} epochs, "
          f"bs {bs}, lr {learn.lr:.2e}, {r.precision}", flush=True)
    t = time.time()
    fit_pretrain(learn)
    took = (time.time() - t) / 60
    model = unwrap(learn.model).float()
    config = dict(asdict(r), n_train=len(dls.train.dataset), data=Path(data).name, minutes=round(took, 1))
    atomic_save({'model': model.state_dict(), 'config': config, 'epoch': epochs - 1}, out / CKPT_NAME)
    torch.save(dict(frames=torch.stack(hist.frames), fixed_loss=hist.fixed_loss, epoch_loss=hist.epoch_loss,
                    batch_loss=[float(l) for l in learn.recorder.losses], iters_per_epoch=len(dls.train),
                    config=config), out / 'history.pt')
    print(f"done in {took:.1f} min: train loss {hist.epoch_loss[0]:.4f} (epoch 0) -> {hist.epoch_loss[-1]:.4f} "
          f"(epoch {epochs - 1}); fixed images {hist.fixed_loss[0]:.4f} -> {hist.fixed_loss[-1]:.4f}", flush=True)
    if images: print('grid rows (epochs):', make_images(out / 'history.pt', Path(images)))
