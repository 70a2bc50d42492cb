"""Parity fixtures for the official ConvMAE downstream backbones (detection and segmentation).

This tool runs the *official* ConvMAE downstream backbone code, read at run time from a git clone of
github.com/Alpha-VL/ConvMAE (nothing of it is copied into this repository), on a tiny configuration with
random weights, and saves what a parity test needs to check that `fastconvmae`, reading an official-layout
checkpoint through its normal reader, reproduces the official feature maps:

* ``tests/fixtures/official_det_tiny.pt``: ``ConvViTDet`` from ``DET/models/convmae.py`` (the detectron2 ViTDet-style
  backbone of the official Mask R-CNN), its detectron2-layout checkpoint ``{'model': {...}}`` (backbone under
  ``backbone.bottom_up.``, plus random FPN / RPN / ROI-head tensors of the official shapes), one input image and the
  four feature maps ``s0..s3``.
* ``tests/fixtures/official_seg_tiny.pt``: ``ConvMAE`` from ``SEG/backbone/convmae.py`` (the mmsegmentation backbone of
  the official UperNet), its mmseg-layout checkpoint ``{'meta': {...}, 'state_dict': {...}}`` (backbone under
  ``backbone.``, plus random UPerHead / FCNHead tensors), one input image and the four maps it returns.

The official code imports detectron2, mmseg/mmcv, einops and the old ``timm.models.layers``; none of them is needed:
small stand-ins are put into ``sys.modules`` while the official source is executed (see `stand_in_modules`).
The only edits to the official text are the `DET_SUBSTITUTIONS` / `SEG_SUBSTITUTIONS` below (each must match exactly
once; the tool prints them as a diff).

Head tensors with more than `SEEDED_ABOVE` elements are not stored: the fixture holds
``{'__seeded__': shape, 'seed': s, 'std': x}`` instead, expanded by `materialise` (importable by path from tests)::

    spec = importlib.util.spec_from_file_location('odf', 'tools/official_downstream_fixtures.py')
    odf = importlib.util.module_from_spec(spec); spec.loader.exec_module(odf)
    ckpt = odf.materialise(torch.load(path, weights_only=True)['checkpoint'])

Rebuild: ``python tools/official_downstream_fixtures.py --repo /path/to/ConvMAE [--out tests/fixtures]``.
See ``tests/fixtures/README.md`` for the fixture format.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import logging
import math
import re
import subprocess
import sys
import tempfile
import types
import zlib
from pathlib import Path

import torch
import torch.nn as nn

# The official code was read from Alpha-VL/ConvMAE at this commit (HEAD of the mirror, 2023-03-14 23:17:35 +0800).
OFFICIAL_COMMIT = '4c97b4c9ec9c85724bc9594eb7302c803ae58c19'
OFFICIAL_REPO = 'Alpha-VL/ConvMAE'
DEFAULT_REPO = Path('/work/.mirror/Alpha-VL+ConvMAE/repo')
DET_FILE, SEG_FILE = 'DET/models/convmae.py', 'SEG/backbone/convmae.py'
DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'tests' / 'fixtures'

SEEDED_ABOVE = 100_000        # floating head tensors with more elements are stored as a seed (no backbone tensor is)
DET_SEED, SEG_SEED = 1, 2     # torch.Generator seeds: backbone weights, then explicit head tensors, in state-dict order
DET_IMAGE_SEED, SEG_IMAGE_SEED = 11, 12
DET_PRETRAIN_SEED = 21        # the fake 14 x 14 pretraining pos_embed
NUM_THREADS = 1               # one intra-op thread: bit-identical reruns, and light on a shared machine

# ConvViT.__init__ (DET) hard-codes the base architecture and ignores its img_size / embed_dim arguments:
# only these two lines are changed. patch_size [4, 2, 2], depth [2, 2, 11], mlp_ratio [4, 4, 4] and num_heads 12
# stay official, so the forward's global blocks (0, 3, 6, 10) and windowed blocks are the official ones.
DET_SUBSTITUTIONS = [
    ('        img_size = [1024, 256, 128]\n', '        img_size = [256, 64, 32]\n'),   # a 256 px input: grid 16 x 16
    ('        embed_dim=[256, 384, 768]\n', '        embed_dim=[32, 48, 96]\n'),      # head dim 96 / 12 = 8
]
# SEG ConvMAE takes its architecture as arguments; the only edit swaps its stride-32 SyncBatchNorm for BatchNorm2d
# (same parameter/buffer names, same eval-mode math, and no process group needed on CPU).
SEG_SUBSTITUTIONS = [
    ('            nn.SyncBatchNorm(embed_dim[-1]),\n', '            nn.BatchNorm2d(embed_dim[-1]),\n'),
]

DET_TINY = dict(img_size=[256, 64, 32], input_size=256, patch_size=[4, 2, 2], embed_dim=[32, 48, 96], depth=[2, 2, 11],
                mlp_ratio=[4, 4, 4], num_heads=12, window_size=8)
# The official DET config (configs/convmae/convmae_base_mask_rcnn_FPN_*.py) passes these; every size among them is
# overridden by the hard-coded lines above, only drop_path_rate (inactive in eval) is used by ConvViT.
DET_OFFICIAL_ARGS = dict(with_cp=False, stop_grad_conv1=False, sincos_pos_embed=True, zero_pos_embed=False, img_size=1024,
                         patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, init_values=None,
                         beit_qkv_bias=False)
# SEG: configs/convmae/upernet_convmae_base_512_slide_160k_ade20k.py with the sizes shrunk (128 px input, grid 8 x 8).
SEG_ARGS = dict(img_size=[128, 32, 16], patch_size=[4, 2, 2], embed_dim=[32, 48, 96], depth=[2, 2, 11], num_heads=12,
                mlp_ratio=[4, 4, 4], qkv_bias=True, use_abs_pos_emb=True, use_rel_pos_bias=True, init_values=1.,
                drop_path_rate=0.2, out_indices=[3, 5, 7, 11])
SEG_INPUT = 128
NUM_DET_CLASSES, NUM_SEG_CLASSES = 2, 3
FPN_CHANNELS = 256                        # detectron2 FPN width of the official config (kept)
SEG_CHANNELS, SEG_AUX_CHANNELS = 64, 32   # UPerHead / FCNHead widths (official: 768 / 256)


# ---------------------------------------------------------------------------------------------------------------
# Seeded tensors
# ---------------------------------------------------------------------------------------------------------------
def seeded(shape, seed: int, std: float) -> dict:
    "The stored description of a tensor too big to store: `torch.randn(shape, generator=manual_seed(seed)) * std`"
    return {'__seeded__': [int(s) for s in shape], 'seed': int(seed), 'std': float(std)}

def is_seeded(x) -> bool: return isinstance(x, dict) and '__seeded__' in x

def materialise(obj):
    "A copy of `obj` (dicts and lists, recursively) with every `{'__seeded__': shape, 'seed', 'std'}` made a float32 tensor"
    if is_seeded(obj):
        g = torch.Generator().manual_seed(obj['seed'])
        return torch.randn(obj['__seeded__'], generator=g, dtype=torch.float32) * obj['std']
    if isinstance(obj, dict): return {k: materialise(v) for k, v in obj.items()}
    if isinstance(obj, list): return [materialise(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Reading and preparing the official source
# ---------------------------------------------------------------------------------------------------------------
def _git(repo: Path, *args) -> str:
    return subprocess.run(['git', '-C', str(repo), *args], check=True, capture_output=True, text=True).stdout

def resolve_commit(repo: Path, rev: str) -> str:
    "Full hash of `rev` in the ConvMAE clone `repo`; exits with a clear message when the clone or the commit is missing"
    hint = "fetch github:Alpha-VL/ConvMAE (e.g. `git clone https://github.com/Alpha-VL/ConvMAE`) and pass --repo PATH"
    if not Path(repo).exists(): sys.exit(f"official ConvMAE repository not found at {repo}: {hint}")
    try: return _git(repo, 'rev-parse', '--verify', f'{rev}^{{commit}}').strip()
    except subprocess.CalledProcessError as e:
        sys.exit(f"{repo} is not a git clone of ConvMAE holding {rev} ({e.stderr.strip()}): {hint}")

def official_source(repo: Path, commit: str, path: str) -> str:
    try: return _git(repo, 'show', f'{commit}:{path}')
    except subprocess.CalledProcessError as e: sys.exit(f"cannot read {path} at {commit} in {repo}: {e.stderr.strip()}")

def substitute(src: str, subs, path: str) -> tuple[str, list[dict]]:
    "Apply `(old, new)` line substitutions (each must match exactly once); print a diff; return the records"
    out, records = src, []
    for old, new in subs:
        n = out.count(old)
        if n != 1: sys.exit(f"{path}: expected exactly one {old.strip()!r} in the official source, found {n}: "
                            f"the official code changed, update the substitutions")
        line = out[:out.index(old)].count('\n') + 1
        records.append(dict(file=path, line=line, old=old.rstrip('\n'), new=new.rstrip('\n')))
        out = out.replace(old, new)
    diff = difflib.unified_diff(src.splitlines(True), out.splitlines(True), f'a/{path}', f'b/{path} (fixture)', n=0)
    print(''.join(diff), end='')
    return out, records


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins for the official code's imports
# ---------------------------------------------------------------------------------------------------------------
def rearrange(x: torch.Tensor, pattern: str, **sizes) -> torch.Tensor:
    "Stand-in for `einops.rearrange`: named axes and parenthesised groups (at most one unknown size per group)"
    def parse(side):
        groups, cur = [], None
        for tok in re.findall(r'\(|\)|\w+', side):
            if tok == '(': cur = []
            elif tok == ')': groups.append(cur); cur = None
            elif cur is not None: cur.append(tok)
            else: groups.append([tok])
        return groups
    lhs, rhs = (parse(s) for s in pattern.split('->'))
    if len(lhs) != x.ndim: raise ValueError(f"{pattern!r}: {len(lhs)} input axes for a {x.ndim}-d tensor")
    known = dict(sizes)
    for grp, n in zip(lhs, x.shape):
        unknown = [a for a in grp if a not in known]
        prod = math.prod(known[a] for a in grp if a in known)
        if len(unknown) > 1 or (unknown and n % prod) or (not unknown and prod != n):
            raise ValueError(f"{pattern!r}: cannot split an axis of {n} into {grp} with {sizes}")
        if unknown: known[unknown[0]] = n // prod
    flat, order = [a for g in lhs for a in g], [a for g in rhs for a in g]
    if sorted(flat) != sorted(order): raise ValueError(f"{pattern!r}: axes differ on the two sides")
    x = x.reshape([known[a] for a in flat]).permute([flat.index(a) for a in order])
    return x.reshape([math.prod(known[a] for a in g) for g in rhs])

class _Logger:
    "Stand-in for detectron2's `setup_logger` / mmseg's `get_root_logger`: records messages (and `.warn`, gone in 3.13)"
    def __init__(self, name): self.name, self.messages = name, []
    def info(self, msg, *a): self.messages.append(('info', msg % a if a else msg))
    def warning(self, msg, *a): self.messages.append(('warning', msg % a if a else msg))
    warn = warning

LOGGERS: list[_Logger] = []

def _setup_logger(name=None, **kwargs):
    LOGGERS.append(_Logger(name)); return LOGGERS[-1]

class _Backbone(nn.Module):
    "Stand-in for `detectron2.modeling.backbone.Backbone` (an nn.Module with `size_divisibility`, `output_shape`)"
    def __init__(self): super().__init__()
    @property
    def size_divisibility(self) -> int: return 0

class _Registry:
    "Stand-in for an mmcv `Registry` (`BACKBONES.register_module()` as a decorator)"
    def __init__(self, name): self.name, self.modules = name, {}
    def register_module(self, name=None, force=False, module=None):
        def reg(cls): self.modules[name or cls.__name__] = cls; return cls
        return reg(module) if module is not None else reg

def _load_checkpoint(*args, **kwargs):
    raise RuntimeError("mmcv_custom.load_checkpoint is a stand-in: the fixture never loads a pretrained SEG checkpoint")

def _timm_layers():
    "timm.layers functions signature-compatible with the old `timm.models.layers` ones the official code imports"
    try: import timm.layers as L
    except ImportError: import timm.models.layers as L   # an old timm: the real module
    m = types.ModuleType('timm.models.layers')
    for f in ('trunc_normal_', 'variance_scaling_', 'drop_path', 'to_2tuple'): setattr(m, f, getattr(L, f))
    return m

def _module(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); return m

def stand_in_modules() -> dict[str, types.ModuleType]:
    "The fake modules installed in `sys.modules` while the official source runs"
    from collections import namedtuple
    ShapeSpec = namedtuple('ShapeSpec', ['channels', 'height', 'width', 'stride'], defaults=[None] * 4)
    mods = {
        'detectron2': _module('detectron2'),
        'detectron2.layers': _module('detectron2.layers', ShapeSpec=ShapeSpec),
        'detectron2.modeling': _module('detectron2.modeling'),
        'detectron2.modeling.backbone': _module('detectron2.modeling.backbone', Backbone=_Backbone),
        'detectron2.utils': _module('detectron2.utils'),
        'detectron2.utils.logger': _module('detectron2.utils.logger', setup_logger=_setup_logger),
        'timm.models.layers': _timm_layers(),
        'mmcv_custom': _module('mmcv_custom', load_checkpoint=_load_checkpoint),
        'mmseg': _module('mmseg'),
        'mmseg.utils': _module('mmseg.utils', get_root_logger=lambda *a, **k: _setup_logger('mmseg')),
        'mmseg.models': _module('mmseg.models'),
        'mmseg.models.builder': _module('mmseg.models.builder', BACKBONES=_Registry('backbone')),
    }
    try: import einops  # noqa: F401  (the real one when installed)
    except ImportError: mods['einops'] = _module('einops', rearrange=rearrange)
    return mods

STAND_INS = [
    'detectron2.layers.ShapeSpec: a namedtuple(channels, height, width, stride)',
    'detectron2.modeling.backbone.Backbone: an nn.Module subclass (size_divisibility 0)',
    'detectron2.utils.logger.setup_logger / mmseg.utils.get_root_logger: a logger recording messages (info, warning, warn)',
    'einops.rearrange: the real einops if installed, else a minimal reshape/permute implementation (no arithmetic)',
    'timm.models.layers.{trunc_normal_, variance_scaling_, drop_path, to_2tuple}: the timm.layers functions '
    '(initialisers only matter before the weights are overwritten; drop_path is inactive in eval)',
    'mmcv_custom.load_checkpoint: raises if called (never called: no pretrained SEG checkpoint)',
    'mmseg.models.builder.BACKBONES: a registry whose register_module() returns the class unchanged',
    'detectron2 ImageList passed to ConvViTDet.forward: types.SimpleNamespace(tensor=image)',
]

@contextlib.contextmanager
def installed(mods: dict):
    "Temporarily put `mods` into `sys.modules` (restoring whatever was there)"
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try: yield
    finally:
        for k, v in saved.items():
            if v is None: sys.modules.pop(k, None)
            else: sys.modules[k] = v

def exec_official(src: str, name: str, origin: str) -> types.ModuleType:
    "Execute official source text as module `name` with the stand-ins installed"
    mod = types.ModuleType(name); mod.__file__ = origin
    with installed(stand_in_modules()): exec(compile(src, origin, 'exec'), mod.__dict__)
    return mod


# ---------------------------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------------------------
def _normal(t: torch.Tensor, g, std: float, mean: float=0.) -> torch.Tensor:
    return torch.randn(t.shape, generator=g) * std + mean

@torch.no_grad()
def randomise_(model: nn.Module, g: torch.Generator, skip=()) -> None:
    """Overwrite every floating parameter and state buffer of `model` (in `named_modules` order) except `skip`:
    conv / linear weights N(0, 1/fan_in), biases N(0, 0.05^2); LayerNorm / BatchNorm weight 1 + N(0, 0.1^2), bias
    N(0, 0.1^2); BN running_mean N(0, 0.1^2), running_var U(0.5, 1.5), num_batches_tracked 1000; relative-position
    tables N(0, 0.5^2); gamma_1 / gamma_2 0.5 + N(0, 0.25^2); pos_embed N(0, 0.5^2). Integer index buffers are kept."""
    done = set()
    def put(name, t, value):
        if name in skip: return
        t.copy_(value); done.add(name)
    for mname, m in model.named_modules():
        p = f'{mname}.' if mname else ''
        for n, t in m.named_parameters(recurse=False):
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)) and n == 'weight':
                v = _normal(t, g, t[0].numel() ** -0.5)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) and n == 'weight': v = _normal(t, g, 0.1, 1.)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)) and n == 'bias': v = _normal(t, g, 0.1)
            elif n == 'bias': v = _normal(t, g, 0.05)
            elif n == 'relative_position_bias_table': v = _normal(t, g, 0.5)
            elif n in ('gamma_1', 'gamma_2'): v = _normal(t, g, 0.25, 0.5)
            elif n == 'pos_embed': v = _normal(t, g, 0.5)
            else: raise ValueError(f"no randomisation rule for parameter {p + n} of {type(m).__name__}")
            put(p + n, t, v)
        if isinstance(m, nn.BatchNorm2d):
            put(p + 'running_mean', m.running_mean, _normal(m.running_mean, g, 0.1))
            put(p + 'running_var', m.running_var, 0.5 + torch.rand(m.running_var.shape, generator=g))
            put(p + 'num_batches_tracked', m.num_batches_tracked, torch.tensor(1000))
    state = model.state_dict()
    left = [k for k, v in state.items() if k not in done and k not in skip
            and not (k.endswith('relative_position_index') and not v.is_floating_point())]
    if left: raise ValueError(f"state left un-randomised: {left}")


def head_tensors(spec, g: torch.Generator) -> dict:
    """Random head tensors from `spec` [(key, shape)]: floating tensors with more than SEEDED_ABOVE elements become
    `seeded(shape, crc32(key), std)`; the others are drawn from `g` in order with the `randomise_` rules."""
    out = {}
    for key, shape in spec:
        leaf = key.rsplit('.', 1)[-1]
        if leaf == 'num_batches_tracked': out[key] = torch.tensor(1000); continue
        t = torch.empty(shape)
        if leaf == 'weight' and len(shape) > 1:
            std = float(math.prod(shape[1:]) ** -0.5)
            out[key] = seeded(shape, zlib.crc32(key.encode()), std) if t.numel() > SEEDED_ABOVE else _normal(t, g, std)
        elif t.numel() > SEEDED_ABOVE: raise ValueError(f"{key}: only weights may be seeded")
        elif '.norm.' in key or '.bn.' in key:
            out[key] = {'weight': lambda: _normal(t, g, 0.1, 1.), 'bias': lambda: _normal(t, g, 0.1),
                        'running_mean': lambda: _normal(t, g, 0.1),
                        'running_var': lambda: 0.5 + torch.rand(shape, generator=g)}[leaf]()
        elif leaf == 'bias': out[key] = _normal(t, g, 0.05)
        else: raise ValueError(f"no rule for {key}")
    return out

def _bn(prefix: str, c: int) -> list:
    return [(f'{prefix}.{n}', [c] if n != 'num_batches_tracked' else [])
            for n in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]

def det_head_spec(in_channels, K: int=NUM_DET_CLASSES, C: int=FPN_CHANNELS) -> list:
    "detectron2 names and official shapes of the FPN, RPN and ROI heads of the ConvMAE Mask R-CNN (K classes)"
    s = []
    for lvl, c in zip(range(2, 6), in_channels):   # FPN: stage = log2(stride); convs with norm have no bias
        s += [(f'backbone.fpn_lateral{lvl}.weight', [C, c, 1, 1])] + _bn(f'backbone.fpn_lateral{lvl}.norm', C)
        s += [(f'backbone.fpn_output{lvl}.weight', [C, C, 3, 3])] + _bn(f'backbone.fpn_output{lvl}.norm', C)
    r = 'proposal_generator.rpn_head'                # StandardRPNHead, conv_dims [-1, -1], 3 anchors per position
    s += [(f'{r}.conv.conv{i}.{n}', [C, C, 3, 3] if n == 'weight' else [C]) for i in range(2) for n in ('weight', 'bias')]
    s += [(f'{r}.objectness_logits.weight', [3, C, 1, 1]), (f'{r}.objectness_logits.bias', [3]),
          (f'{r}.anchor_deltas.weight', [12, C, 1, 1]), (f'{r}.anchor_deltas.bias', [12])]
    b = 'roi_heads.box_head'                         # FastRCNNConvFCHead: 4 convs (norm), fc 1024
    for i in range(1, 5): s += [(f'{b}.conv{i}.weight', [C, C, 3, 3])] + _bn(f'{b}.conv{i}.norm', C)
    s += [(f'{b}.fc1.weight', [1024, C * 7 * 7]), (f'{b}.fc1.bias', [1024])]
    p = 'roi_heads.box_predictor'                    # background is the LAST class; class-specific boxes
    s += [(f'{p}.cls_score.weight', [K + 1, 1024]), (f'{p}.cls_score.bias', [K + 1]),
          (f'{p}.bbox_pred.weight', [4 * K, 1024]), (f'{p}.bbox_pred.bias', [4 * K])]
    m = 'roi_heads.mask_head'                        # MaskRCNNConvUpsampleHead: 4 convs (norm), deconv, predictor
    for i in range(1, 5): s += [(f'{m}.mask_fcn{i}.weight', [C, C, 3, 3])] + _bn(f'{m}.mask_fcn{i}.norm', C)
    s += [(f'{m}.deconv.weight', [C, C, 2, 2]), (f'{m}.deconv.bias', [C]),
          (f'{m}.predictor.weight', [K, C, 1, 1]), (f'{m}.predictor.bias', [K])]
    return s

def seg_head_spec(in_channels, K: int=NUM_SEG_CLASSES, C: int=SEG_CHANNELS, Ca: int=SEG_AUX_CHANNELS,
                  pool_scales=(1, 2, 3, 6), aux_index: int=2) -> list:
    "mmseg names and shapes of UPerHead (channels C) and the auxiliary FCNHead (channels Ca, 1 conv), K classes"
    d, s = 'decode_head', []
    conv = lambda name, cout, cin, k: [(f'{name}.conv.weight', [cout, cin, k, k])] + _bn(f'{name}.bn', cout)
    s += [(f'{d}.conv_seg.weight', [K, C, 1, 1]), (f'{d}.conv_seg.bias', [K])]
    for i in range(len(pool_scales)): s += conv(f'{d}.psp_modules.{i}.1', C, in_channels[-1], 1)
    s += conv(f'{d}.bottleneck', C, in_channels[-1] + len(pool_scales) * C, 3)
    for i, c in enumerate(in_channels[:-1]): s += conv(f'{d}.lateral_convs.{i}', C, c, 1)
    for i in range(len(in_channels) - 1): s += conv(f'{d}.fpn_convs.{i}', C, C, 3)
    s += conv(f'{d}.fpn_bottleneck', C, len(in_channels) * C, 3)
    a = 'auxiliary_head'
    s += [(f'{a}.conv_seg.weight', [K, Ca, 1, 1]), (f'{a}.conv_seg.bias', [K])] + conv(f'{a}.convs.0', Ca, in_channels[aux_index], 3)
    return s


# ---------------------------------------------------------------------------------------------------------------
# Building the fixtures
# ---------------------------------------------------------------------------------------------------------------
def _clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

@torch.no_grad()
def _sensitivity(model, run, feats, names) -> dict:
    "Relative change of the last map when the named state is neutralised (zero tables, unit gammas): > 0 means it matters"
    state, out = _clone_state(model), {}
    for label, pred, value in names:
        sd = {k: (torch.full_like(v, value) if pred(k) else v) for k, v in state.items()}
        model.load_state_dict(sd)
        y, ref = run()[-1], feats[-1]
        out[label] = float((y - ref).norm() / ref.norm())
    model.load_state_dict(state)
    return out

@torch.no_grad()
def build_det(repo: Path, commit: str) -> dict:
    "The detection fixture: official ConvViTDet (tiny), its detectron2 checkpoint, an image and the maps s0..s3"
    src, subs = substitute(official_source(repo, commit, DET_FILE), DET_SUBSTITUTIONS, DET_FILE)
    mod = exec_official(src, 'official_convmae_det', f'{OFFICIAL_REPO}@{commit[:12]}:{DET_FILE}')
    E, grid = DET_TINY['embed_dim'][-1], DET_TINY['img_size'][2] // DET_TINY['patch_size'][2]
    # the pretraining pos_embed (ConvMAE pretraining on 224 px: 14 x 14 tokens), resized by the official constructor
    pre = torch.randn(1, 196, E, generator=torch.Generator().manual_seed(DET_PRETRAIN_SEED)) * 0.5
    torch.manual_seed(DET_SEED)   # the constructor's own initialisers (all overwritten below)
    with tempfile.TemporaryDirectory() as tmp, installed(stand_in_modules()):
        ck = Path(tmp) / 'convmae_pretrain.pth'
        torch.save({'model': {'pos_embed': pre}}, ck)
        model = mod.ConvViTDet(window_size=DET_TINY['window_size'], pretrained=str(ck), **DET_OFFICIAL_ARGS).eval()
        log = [f"{lvl}: {m.replace(tmp, '<tmp>')}" for lg in LOGGERS for lvl, m in lg.messages]   # no temp paths: reproducible
        LOGGERS.clear()
    expect = mod.resize_pos_embed(pre, model.pos_embed, model.num_tokens, model.patch_embed3.grid_size)
    assert torch.equal(model.pos_embed, expect), "the official constructor did not load the resized pos_embed"
    randomise_(model, torch.Generator().manual_seed(DET_SEED), skip={'pos_embed'})
    image = torch.randn(1, 3, DET_TINY['input_size'], DET_TINY['input_size'], generator=torch.Generator().manual_seed(DET_IMAGE_SEED))
    run = lambda: list(model(types.SimpleNamespace(tensor=image)).values())
    with installed(stand_in_modules()): outs = model(types.SimpleNamespace(tensor=image))
    names, feats = list(outs), [v.contiguous() for v in outs.values()]
    with installed(stand_in_modules()):
        sens = _sensitivity(model, run, feats, [
            ('windowed_table_zeroed', lambda k: k == 'windowed_rel_pos_bias.relative_position_bias_table', 0.),
            ('global_table_zeroed', lambda k: k == 'global_rel_pos_bias.relative_position_bias_table', 0.),
            ('pos_embed_zeroed', lambda k: k == 'pos_embed', 0.)])
        backbone = _clone_state(model)
        # the checkpoint alone must reproduce the maps: a fresh official model (no pretrained file) loads it strictly
        fresh = mod.ConvViTDet(window_size=DET_TINY['window_size'], pretrained='', **DET_OFFICIAL_ARGS).eval()
        fresh.load_state_dict(backbone, strict=True)
        again = fresh(types.SimpleNamespace(tensor=image))
    assert all(torch.equal(again[n], f) for n, f in zip(names, feats)), "checkpoint does not reproduce the maps"
    chans = [f.shape[1] for f in feats]
    sd = {}
    heads = head_tensors(det_head_spec(chans), torch.Generator().manual_seed(DET_SEED + 1000))
    for k, v in heads.items():                       # detectron2 FPN order: its own convs, then bottom_up
        if k.startswith('backbone.'): sd[k] = v
    sd.update({f'backbone.bottom_up.{k}': v for k, v in backbone.items()})
    sd.update({k: v for k, v in heads.items() if not k.startswith('backbone.')})
    assert not any(is_seeded(v) for k, v in sd.items() if k.startswith('backbone.bottom_up.'))
    nb = len(model.blocks3)
    config = dict(
        model='ConvViTDet (official DET/models/convmae.py), tiny', **DET_TINY,
        grid=[grid, grid], windows_per_side=grid // DET_TINY['window_size'],
        global_blocks=[0, 3, 6, 10], windowed_blocks=[1, 2, 4, 5, 7, 8, 9],
        global_attn_index_attribute=list(model.global_attn_index),
        rel_pos='shared: windowed_rel_pos_bias (window 8 x 8) for windowed blocks, global_rel_pos_bias (16 x 16) for global ones',
        windowed_table_shape=list(model.windowed_rel_pos_bias.relative_position_bias_table.shape),
        global_table_shape=list(model.global_rel_pos_bias.relative_position_bias_table.shape),
        qkv_bias=True, layer_scale=None, attn_scale='(q @ k^T) * head_dim^-0.5',
        ln_eps={'patch_embed{1,2,3}.norm': model.patch_embed1.norm.eps, 'blocks1/blocks2 (CBlock norm1, norm2)': model.blocks1[0].norm1.eps,
                'blocks3 (Block norm1, norm2)': model.blocks3[0].norm1.eps},
        pos_embed='the 14 x 14 pretraining pos_embed resized bicubically (align_corners=False) by the official constructor',
        pretrain_grid=[14, 14], pos_embed_requires_grad=bool(model.pos_embed.requires_grad), sincos_pos_embed=True, sincos_note='build_2d_sincos_position_embedding discards its result',
        s3='MaxPool2d(2) of s2', feature_names=names, feature_channels=chans,
        feature_strides=[DET_TINY['input_size'] // f.shape[-1] for f in feats],
        output_shape_channels_hardcoded=dict(model._out_feature_channels),
        drop_path_rate=DET_OFFICIAL_ARGS['drop_path_rate'], eval=True, num_blocks3=nb,
        num_classes=NUM_DET_CLASSES, fpn_channels=FPN_CHANNELS, image='randn, already normalised (what the backbone sees)',
        seeds=dict(backbone=DET_SEED, heads=DET_SEED + 1000, image=DET_IMAGE_SEED, pretrain_pos_embed=DET_PRETRAIN_SEED,
                   seeded_tensors='zlib.crc32(key)'), seeded_above=SEEDED_ABOVE, num_threads=NUM_THREADS,
        sensitivity_last_map=sens, constructor_log=log,
        official_base=dict(img_size=[1024, 256, 128], embed_dim=[256, 384, 768], window_size=16, input_size=1024))
    LOGGERS.clear()
    return dict(checkpoint={'model': sd}, image=image, features=dict(zip(names, feats)), feature_names=names,
                config=config, pretrain_pos_embed=pre, source=f'{OFFICIAL_REPO}@{commit} {DET_FILE}',
                substitutions=subs, stand_ins=STAND_INS, official_args=dict(DET_OFFICIAL_ARGS, window_size=DET_TINY['window_size']))

@torch.no_grad()
def build_seg(repo: Path, commit: str) -> dict:
    "The segmentation fixture: official mmseg ConvMAE (tiny), its mmseg checkpoint, an image and the 4 maps"
    src, subs = substitute(official_source(repo, commit, SEG_FILE), SEG_SUBSTITUTIONS, SEG_FILE)
    mod = exec_official(src, 'official_convmae_seg', f'{OFFICIAL_REPO}@{commit[:12]}:{SEG_FILE}')
    torch.manual_seed(SEG_SEED)
    with installed(stand_in_modules()): model = mod.ConvMAE(**SEG_ARGS).eval()
    randomise_(model, torch.Generator().manual_seed(SEG_SEED))
    image = torch.randn(1, 3, SEG_INPUT, SEG_INPUT, generator=torch.Generator().manual_seed(SEG_IMAGE_SEED))
    with installed(stand_in_modules()):
        feats = [f.contiguous() for f in model(image)]
        sens = _sensitivity(model, lambda: model(image), feats, [
            ('tables_zeroed', lambda k: k.endswith('relative_position_bias_table'), 0.),
            ('gammas_one', lambda k: k.endswith(('gamma_1', 'gamma_2')), 1.),
            ('pos_embed_zeroed', lambda k: k == 'pos_embed', 0.)])
        backbone = _clone_state(model)
        fresh = mod.ConvMAE(**SEG_ARGS).eval()
        fresh.load_state_dict(backbone, strict=True)
        again = fresh(image)
    assert all(torch.equal(a, f) for a, f in zip(again, feats)), "checkpoint does not reproduce the maps"
    chans = [f.shape[1] for f in feats]
    sd = {f'backbone.{k}': v for k, v in backbone.items()}
    sd.update(head_tensors(seg_head_spec(chans), torch.Generator().manual_seed(SEG_SEED + 1000)))
    assert not any(is_seeded(v) for k, v in sd.items() if k.startswith('backbone.'))
    classes = [f'class{i}' for i in range(NUM_SEG_CLASSES)]
    meta = dict(CLASSES=classes, PALETTE=[[120, 120, 120], [180, 120, 120], [6, 230, 230]], iter=160000,
                note=f'synthetic fixture: random weights; backbone = {OFFICIAL_REPO}@{commit} {SEG_FILE}',
                config=(f"model = dict(type='EncoderDecoder', backbone=dict(type='ConvMAE', **{SEG_ARGS!r}), "
                        f"decode_head=dict(type='UPerHead', in_channels={chans}, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), "
                        f"channels={SEG_CHANNELS}, num_classes={NUM_SEG_CLASSES}), auxiliary_head=dict(type='FCNHead', "
                        f"in_channels={chans[2]}, in_index=2, channels={SEG_AUX_CHANNELS}, num_convs=1, concat_input=False, "
                        f"num_classes={NUM_SEG_CLASSES}))"))
    config = dict(
        model='ConvMAE (official SEG/backbone/convmae.py, mmseg backbone), tiny', **SEG_ARGS, input_size=SEG_INPUT,
        grid=list(model.patch_embed3.patch_shape), rel_pos='per block: blocks3.i.attn.relative_position_bias_table over the whole grid',
        table_shape=list(model.blocks3[0].attn.relative_position_bias_table.shape), layer_scale='gamma_1, gamma_2 per block',
        attn_scale='(q * head_dim^-0.5) @ k^T', window_size=None, global_blocks='all',
        ln_eps={'patch_embed{1,2,3}.norm': model.patch_embed1.norm.eps, 'blocks1/blocks2 (CBlock norm1, norm2)': model.blocks1[0].norm1.eps,
                'blocks3 (Block norm1, norm2)': model.blocks3[0].norm1.eps},
        bn_eps=model.fpn[1].eps,
        last_map='fpn: Conv2d(96, 96, k3, s2, padding 0, bias) -> BatchNorm2d (official SyncBatchNorm) -> GELU',
        feature_channels=chans, feature_shapes=[list(f.shape) for f in feats], eval=True,
        num_classes=NUM_SEG_CLASSES, decode_channels=SEG_CHANNELS, aux_channels=SEG_AUX_CHANNELS, aux_index=2,
        pool_scales=[1, 2, 3, 6], image='randn, already normalised (what the backbone sees)',
        seeds=dict(backbone=SEG_SEED, heads=SEG_SEED + 1000, image=SEG_IMAGE_SEED, seeded_tensors='zlib.crc32(key)'),
        seeded_above=SEEDED_ABOVE, num_threads=NUM_THREADS, sensitivity_last_map=sens,
        official_base=dict(img_size=[512, 128, 64], embed_dim=[256, 384, 768], input_size=512, channels=768, aux_channels=256))
    LOGGERS.clear()
    return dict(checkpoint={'meta': meta, 'state_dict': sd}, image=image, features=feats, config=config,
                source=f'{OFFICIAL_REPO}@{commit} {SEG_FILE}', substitutions=subs, stand_ins=STAND_INS,
                official_args=dict(SEG_ARGS))


# ---------------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------------
def _count(obj, acc=None) -> dict:
    acc = acc if acc is not None else {'tensors': 0, 'seeded': 0, 'elements': 0}
    if torch.is_tensor(obj): acc['tensors'] += 1; acc['elements'] += obj.numel()
    elif is_seeded(obj): acc['seeded'] += 1
    elif isinstance(obj, dict): [_count(v, acc) for v in obj.values()]
    elif isinstance(obj, list): [_count(v, acc) for v in obj]
    return acc

def verify(path: Path) -> None:
    "Reload a fixture with weights_only=True and print its contents"
    fx = torch.load(path, weights_only=True)
    print(f"{path}: {path.stat().st_size / 2**20:.2f} MiB, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}, "
          f"loads with weights_only=True")
    ck = fx['checkpoint']
    sd = ck['model'] if 'model' in ck else ck['state_dict']
    for k, v in fx.items(): print(f"  {k}: {type(v).__name__} {_count(v)}")
    print(f"  checkpoint keys: {len(sd)} ({sum(is_seeded(v) for v in sd.values())} seeded: "
          f"{[k for k, v in sd.items() if is_seeded(v)]})")
    feats = fx['features'].items() if isinstance(fx['features'], dict) else enumerate(fx['features'])
    for n, f in feats: print(f"  map {n}: {list(f.shape)} std {f.std():.3f}")
    print(f"  sensitivity of the last map: {fx['config']['sensitivity_last_map']}")
    full = materialise(ck)
    assert all(torch.is_tensor(v) for v in (full['model'] if 'model' in full else full['state_dict']).values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repo', type=Path, default=DEFAULT_REPO, help=f"git clone of {OFFICIAL_REPO} (default {DEFAULT_REPO})")
    ap.add_argument('--rev', default=OFFICIAL_COMMIT, help="commit of the official code to run (default: the pinned one)")
    ap.add_argument('--out', type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    commit = resolve_commit(args.repo, args.rev)
    if commit != OFFICIAL_COMMIT: print(f"warning: building from {commit}, not the pinned {OFFICIAL_COMMIT}")
    args.out.mkdir(parents=True, exist_ok=True)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.meshgrid')   # the official code calls meshgrid without indexing
        for name, build in (('official_det_tiny.pt', build_det), ('official_seg_tiny.pt', build_seg)):
            torch.save(build(args.repo, commit), args.out / name)
            verify(args.out / name)


if __name__ == '__main__':
    main()
