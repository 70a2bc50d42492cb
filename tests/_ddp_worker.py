"""Worker for tests/test_ddp.py: a few pretraining steps through `pretrain_learner` / `fit_pretrain`.

Run alone (one process, batch 4) or under `torchrun --nproc_per_node 2` (batch 2 per rank); writes
the final state dict of each rank to OUT/rank{r}.pt. Inputs and masks are deterministic per image
(masking noise derived from the image itself), so both runs see the same global batches.
It also records, after the command lines' per-rank seeding (`launch_setup` then `seed_rank`), the
mask the standard model draws for the same image on each rank (OUT/mask{r}.pt).
"""
import sys, torch
from pathlib import Path
from dataclasses import replace
from fastai.data.core import DataLoaders
from fastai.distributed import rank_distrib, num_distrib
from fastconvmae.models import MaskedAutoencoderConvViT, fastconvmae_convvit_tiny_patch16
from fastconvmae.masking import patchify
from fastconvmae.data import PretrainDL
from fastconvmae.pretrain import PRESETS, pretrain_learner, fit_pretrain, launch_setup, seed_rank

class ImageNoiseMAE(MaskedAutoencoderConvViT):
    "Masks drawn from noise computed from each image, so they do not depend on how the batch is split."
    def forward(self, imgs, mask_ratio=None, noise=None):
        return super().forward(imgs, mask_ratio, patchify(imgs).mean(-1))

def main(out, bs):
    rank, world, _ = launch_setup(0)
    torch.manual_seed(0)
    items = [(torch.randn(3, 64, 64), 0) for _ in range(16)]
    train = PretrainDL(items, bs=bs, shuffle=True, seed=0, rank=rank, world_size=world, drop_last=True)
    valid = PretrainDL(items[:2], bs=2, shuffle=False)
    dls = DataLoaders(train, valid, device='cpu')
    ref = fastconvmae_convvit_tiny_patch16(img_size=64, norm_pix_loss=True)
    model = ImageNoiseMAE(img_size=64, embed_dim=ref.embed_dim, depth=ref.depth, num_heads=ref.num_heads,
                          decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True, complementary=True)
    torch.manual_seed(1); model.initialize_weights()
    recipe = replace(PRESETS['cpu'], epochs=2, warmup_epochs=1, blr=5e-2, precision='fp32', img_size=64)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f'init{rank}.pt')
    learn = pretrain_learner(dls, recipe, model=model, output=Path(out), save_every=1, figures=False, log=False)
    seed_rank(0)  # as the command lines do once the model is built
    with torch.no_grad(): torch.save(ref(items[0][0][None])[2], Path(out) / f'mask{rank}.pt')
    with learn.no_bar(), learn.no_logging(): fit_pretrain(learn)
    torch.save({k: v.detach().clone() for k, v in learn.model.state_dict().items()}, Path(out) / f'rank{rank}.pt')
    print(f'rank {rank}/{world}: eff batch {learn.eff_bs}, steps {learn.train_iter}')

if __name__ == '__main__':
    main(sys.argv[1], int(sys.argv[2]))
