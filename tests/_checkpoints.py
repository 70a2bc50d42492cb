"A tiny labelled folder, and checkpoints in the layouts users bring built from this package's models (shared by the fine-tuning tests)."
import shutil
from pathlib import Path
import torch

DATA = Path(__file__).resolve().parents[1] / 'data'

def make_toy(root: Path) -> Path:
    "An ImageNet-layout folder of copies of the bundled photos: 8 training and 4 validation images in 2 classes"
    photos = sorted(DATA.glob('*.jpg'))
    for split, n in [('train', 8), ('val', 4)]:
        for i in range(n):
            d = Path(root) / split / f'class{i % 2}'; d.mkdir(parents=True, exist_ok=True)
            shutil.copy(photos[i % len(photos)], d / f'img{i}.jpg')
    return Path(root)

# EasyCV's module names, read from alibaba/EasyCV: `easycv/models/selfsup/mae.py` (class MAE: `self.encoder` = the
# `FastConvMAEViT` backbone of `easycv/models/backbones/conv_mae_vit.py`, whose attributes are the official names, with
# `stage1_output_decode`/`stage2_output_decode` when `with_fuse` and `norm` without global pooling; `self.decoder` = the
# `FastConvMAENeck` of `easycv/models/selfsup/necks.py`: decoder_embed, mask_token, decoder_pos_embed, decoder_blocks,
# decoder_norm, decoder_pred) and `easycv/models/classification/classification.py` (class Classification: `self.backbone`,
# heads as `head_0`, ...; `ClsHead` of `easycv/models/heads/cls_head.py` holds its linear layer as `fc_cls`). mmcv saves
# `{'meta': ..., 'state_dict': model.state_dict(), 'optimizer': ...}`.
EASYCV_DECODER = ('decoder_embed.', 'mask_token', 'decoder_pos_embed', 'decoder_blocks.', 'decoder_norm.', 'decoder_pred.')

def as_easycv_pretraining(sd: dict) -> dict:
    "An official pretraining state dict as EasyCV's `MAE` checkpoint stores it"
    return {'meta': {'epoch': 50, 'config': "model = dict(type='MAE', backbone=dict(type='FastConvMAEViT'))"},
            'state_dict': {('decoder.' if k.startswith(EASYCV_DECODER) else 'encoder.') + k: v for k, v in sd.items()},
            'optimizer': {'state': {}, 'param_groups': []}}

def as_easycv_classifier(sd: dict) -> dict:
    "An official fine-tuned classifier's state dict as EasyCV's `Classification` checkpoint stores it"
    return {'meta': {'epoch': 100}, 'state_dict': {('head_0.fc_cls.' + k[len('head.'):] if k.startswith('head.') else 'backbone.' + k): v
                                                   for k, v in sd.items()}}

def mor_checkpoint(out: Path, **widths) -> Path:
    "A real checkpoint of this package's MoR pretraining (pixel + EMA targets, 64 px), after one epoch on the bundled photos"
    from fastconvmae.data import pretrain_dls
    from fastconvmae.mor import MaskedAutoencoderConvViTMoR, MoRRecipe, mor_learner
    from fastconvmae.pretrain import fit_pretrain
    torch.manual_seed(0)
    m = MaskedAutoencoderConvViTMoR(targets=('pixel', 'ema'), img_size=64, decoder_embed_dim=32, decoder_depth=2,
                                    decoder_num_heads=4, norm_pix_loss=True, **widths)
    r = MoRRecipe(targets=('pixel', 'ema'), img_size=64, bs=2, epochs=1, warmup_epochs=0, blr=1e-2, precision='fp32')
    learn = mor_learner(pretrain_dls(DATA, img_size=64, bs=2, num_workers=0, valid=2, device='cpu'), r, model=m, output=out,
                        figures=False, log=False)
    with learn.no_bar(), learn.no_logging(): fit_pretrain(learn)
    return out / 'checkpoint-latest.pth'
