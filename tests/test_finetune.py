"API-level tests of fine-tuning and linear probing (the notebooks 07 and 08 test the pieces)."
import argparse, math, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn
from fastai.callback.core import Callback, CancelFitException
from fastconvmae.encoder import ConvViT, convvit_base_patch16, convvit_tiny_patch16
from fastconvmae.models import MaskedAutoencoderConvViT, fastconvmae_convvit_tiny_patch16
from fastconvmae.finetune import (load_checkpoint, load_pretrained, UnsafeCheckpointError, CheckpointMismatchError, BadCheckpointError,
                                  convert_state_dict, checkpoint_layout,
                                  layer_decay_groups, convvit_layer_id, finetune_dls, finetune_learner, finetune, finetune_transform,
                                  posterize_any_bits, MixupCallback, SoftTargetLoss, TopK, results, FINETUNE_PRESETS)
from fastconvmae import finetune as ft
from fastconvmae.linprobe import linprobe_model, lars, linprobe, quick_probe, fit_linear
from _checkpoints import make_toy, EASYCV_DECODER as _EASYCV_DECODER, as_easycv_pretraining, as_easycv_classifier, mor_checkpoint as _mor_checkpoint

DATA = Path(__file__).resolve().parents[1] / 'data'
TINY = dict(embed_dim=(16, 24, 48), depth=(1, 1, 2), num_heads=4)   # the parity fixtures' widths


class Payload:  # a pickle that would run code
    def __reduce__(self): return (print, ('code ran',))


@pytest.fixture(scope='module')
def toy(tmp_path_factory): return make_toy(tmp_path_factory.mktemp('toy'))


@pytest.fixture(scope='module')
def pretrain_sd():
    "An official-layout Fast ConvMAE state dict of the fixtures' tiny configuration."
    torch.manual_seed(0)
    return MaskedAutoencoderConvViT(img_size=224, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4,
                                    complementary=True, **TINY).state_dict()




# ---------------------------------------------------------------- safe loading
def test_official_namespace_loads_and_payload_is_refused(tmp_path, pretrain_sd):
    torch.save({'model': pretrain_sd, 'epoch': 3, 'args': argparse.Namespace(blr=6e-4, model='x')}, tmp_path / 'ok.pth')
    assert load_checkpoint(tmp_path / 'ok.pth')['args'].blr == 6e-4
    torch.save({'model': pretrain_sd, 'x': Payload()}, tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match="global 'print'.*trusted=True"):
        load_checkpoint(tmp_path / 'evil.pth')
    assert isinstance(UnsafeCheckpointError('x'), __import__('pickle').UnpicklingError)
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / 'missing.pth')


@pytest.mark.parametrize('layout', ['alphavl', 'easycv', 'safetensors', 'ddp', 'bare'])
def test_every_layout_loads_the_same_encoder(tmp_path, pretrain_sd, layout):
    from safetensors.torch import save_file
    sd = pretrain_sd
    if layout == 'alphavl': torch.save({'model': sd, 'args': argparse.Namespace(a=1)}, f := tmp_path / 'c.pth')
    elif layout == 'easycv': torch.save(as_easycv_pretraining(sd), f := tmp_path / 'c.pth')
    elif layout == 'safetensors': save_file({k: v.contiguous() for k, v in sd.items()}, f := tmp_path / 'c.safetensors')
    elif layout == 'ddp': torch.save({'model': {'module.' + k: v for k, v in sd.items()}}, f := tmp_path / 'c.pth')
    else: torch.save(sd, f := tmp_path / 'c.pth')
    m = ConvViT(img_size=64, num_classes=10, **TINY)
    rep = load_pretrained(m, f, verbose=False)
    assert rep.pos_embed_resampled == ('14x14', '4x4')
    assert sorted(rep.initialised) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert not any(k.startswith(('decoder', 'mask_token', 'stage1_output', 'norm.')) for k in rep.loaded)
    for k in ['blocks1.0.attn.weight', 'blocks3.1.mlp.fc2.weight', 'patch_embed4.weight']:
        assert torch.equal(m.state_dict()[k], sd[k])
    assert m.head.weight.std() < 1e-4  # the official fine-tuning head init (std 2e-5)
    assert 'loaded' in str(rep) and 'dropped' in str(rep)


def test_official_finetuned_classifier_fixture(fixtures_dir, tmp_path):
    d = torch.load(fixtures_dir / 'official_convvit_tiny_cls.pt', weights_only=False)
    torch.save({'model': d['state_dict'], 'args': argparse.Namespace(nb_classes=10)}, tmp_path / 'ft.pth')
    for ck in [tmp_path / 'ft.pth', as_easycv_classifier(d['state_dict'])]:
        m = ConvViT(img_size=224, num_classes=10, **TINY).eval()
        rep = load_pretrained(m, ck, verbose=False)
        assert rep.initialised == []
        with torch.no_grad(): torch.testing.assert_close(m(d['imgs']), d['logits'], rtol=1e-4, atol=1e-5)


def test_official_pretrain_fixture(fixtures_dir):
    sd = torch.load(fixtures_dir / 'official_fastconvmae_tiny.pt', weights_only=False)['state_dict']
    m = ConvViT(img_size=96, num_classes=3, **TINY)
    rep = load_pretrained(m, {'model': sd}, verbose=False)
    assert rep.pos_embed_resampled == ('14x14', '6x6')


def test_mismatches_are_clear_errors(tmp_path, pretrain_sd):
    wider = ConvViT(img_size=64, num_classes=10, embed_dim=(16, 24, 64), depth=(1, 1, 2), num_heads=4).state_dict()
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        load_pretrained(ConvViT(img_size=64, num_classes=10, **TINY), wider, verbose=False)
    vit = {'cls_token': torch.zeros(1, 1, 48), 'blocks.0.attn.qkv.weight': torch.zeros(144, 48)}
    with pytest.raises(CheckpointMismatchError, match='missing from the checkpoint') as e:
        load_pretrained(ConvViT(img_size=64, num_classes=10, **TINY), {'model': vit}, verbose=False)
    assert 'does not have: cls_token' in str(e.value)     # both kinds of problem in one message
    ten = ConvViT(img_size=64, num_classes=10, **TINY).state_dict()
    with pytest.raises(CheckpointMismatchError, match='10 classes, the model.s 5.*reset_head=True'):
        load_pretrained(ConvViT(img_size=64, num_classes=5, **TINY), ten, verbose=False)
    m = ConvViT(img_size=64, num_classes=5, **TINY)
    rep = load_pretrained(m, ten, reset_head=True, verbose=False)
    assert rep.head_reset and sorted(rep.initialised) == ['head.bias', 'head.weight']
    assert torch.equal(m.fc_norm.weight, ten['fc_norm.weight'])
    with pytest.raises(ValueError, match='no state dict'): load_pretrained(m, {'epoch': 3}, verbose=False)


# ---------------------------------------------------------------- layer decay, optimizer, schedule
def test_layer_ids_and_scales_official():
    base = convvit_base_patch16()
    lg = layer_decay_groups(base, layer_decay=0.65, weight_decay=0.05)
    ids = {n: l for ns, l in zip(lg.names, lg.layer_ids) for n in ns}
    scale = {n: s for ns, s in zip(lg.names, lg.lr_scales) for n in ns}
    wd = {n: w for ns, w in zip(lg.names, lg.wds) for n in ns}
    assert ids['pos_embed'] == ids['patch_embed1.proj.weight'] == ids['blocks1.1.mlp.fc1.weight'] == ids['blocks2.0.attn.weight'] == 0
    assert [ids[f'blocks3.{i}.attn.qkv.weight'] for i in range(11)] == list(range(1, 12))
    assert ids['fc_norm.weight'] == ids['head.weight'] == 12
    assert math.isclose(scale['pos_embed'], 0.65 ** 12) and scale['head.bias'] == 1.
    assert math.isclose(scale['blocks3.4.norm1.weight'], 0.65 ** 7)
    assert wd['pos_embed'] == 0 and wd['head.bias'] == 0 and wd['blocks3.0.norm1.weight'] == 0 and wd['head.weight'] == 0.05
    assert convvit_layer_id('blocks3.10.mlp.fc2.bias', 11) == 11


def test_timm_layer_decay_differs_only_for_fc_norm():
    from timm.optim._param_groups import param_groups_layer_decay
    base = convvit_base_patch16()
    tg = param_groups_layer_decay(base, weight_decay=0.05, no_weight_decay_list=base.no_weight_decay(), layer_decay=0.65)
    pid = {id(p): n for n, p in base.named_parameters()}
    timm_scale = {pid[id(p)]: g['lr_scale'] for g in tg for p in g['params']}
    lg = layer_decay_groups(base, layer_decay=0.65)
    ours = {n: s for ns, s in zip(lg.names, lg.lr_scales) for n in ns}
    assert [n for n in ours if not math.isclose(ours[n], timm_scale[n])] == ['fc_norm.weight', 'fc_norm.bias']


def test_learner_optimizer_groups_and_schedule(toy):
    dls = finetune_dls(toy, img_size=64, bs=4, num_workers=0, device='cpu')
    learn = finetune_learner(dls, convvit_tiny_patch16(num_classes=2, img_size=64), lr=1e-3, layer_decay=0.75,
                             mixup=0, cutmix=0, smoothing=0)
    seen = []
    class Spy(Callback):
        order, run_valid = 70, False  # after ParamScheduler, training batches only
        def before_batch(self):
            seen.append({self.learn._names[id(p)]: (g['lr'], g['weight_decay']) for g in self.opt.opt.param_groups for p in g['params']})
    learn._names = {id(p): n for n, p in learn.model.named_parameters()}
    with learn.no_bar(), learn.no_logging(): learn.fit_warmup_cos(2, warmup_epochs=1, min_lr=1e-6, cbs=Spy())
    assert len(seen) == 4
    for n, (lr, wd) in seen[2].items():   # first iteration after warm-up: the peak
        lid = convvit_layer_id(n, 6)
        assert math.isclose(lr, 1e-3 * 0.75 ** (7 - lid)), n
        p = learn.model.get_parameter(n)
        assert wd == (0. if p.ndim == 1 or n == 'pos_embed' else 0.05), n
    assert all(lr == 0 for lr, _ in seen[0].values())
    assert isinstance(learn.opt.opt, torch.optim.AdamW) and learn.opt.opt.param_groups[0]['betas'] == (0.9, 0.999)


def test_class_mismatch_caught_before_training(toy):
    dls = finetune_dls(toy, img_size=64, bs=4, num_workers=0, device='cpu')
    with pytest.raises(ValueError, match='2 classes.*1000 outputs'):
        finetune_learner(dls, convvit_tiny_patch16(num_classes=1000, img_size=64))
    learn = finetune_learner(dls, convvit_tiny_patch16(num_classes=2, img_size=64))
    learn.model.reset_classifier(3)
    with pytest.raises(ValueError, match='3 outputs'): learn.fit(1)


def test_validation_classes_must_match_training(tmp_path, toy):
    shutil.copytree(toy, tmp_path / 'd')
    shutil.move(tmp_path / 'd' / 'val' / 'class1', tmp_path / 'd' / 'val' / 'other')
    with pytest.raises(ValueError, match='differ'): finetune_dls(tmp_path / 'd', img_size=64, bs=4, num_workers=0)


# ---------------------------------------------------------------- data, mixup, loss, metrics
def test_randaugment_posterize_zero_bits_is_black():
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    im = Image.open(DATA / 'astronaut.jpg').convert('RGB')
    op = AugmentOp('PosterizeIncreasing', prob=1., magnitude=10)
    op.aug_fn = posterize_any_bits
    assert np.asarray(op(im)).max() == 0
    tf = finetune_transform(64)
    torch.manual_seed(0)
    for _ in range(50): assert tf(im).shape == (3, 64, 64)


def test_mixup_targets_and_soft_loss():
    from timm.loss import LabelSmoothingCrossEntropy
    class L: training = True
    cb = MixupCallback(10, mixup=0, cutmix=0, smoothing=0.1); cb.learn = L()
    y = torch.tensor([1, 2, 3, 4]); logits = torch.randn(4, 10)
    cb.learn.xb, cb.learn.yb = (torch.randn(4, 3, 8, 8),), (y,)
    cb.before_batch()
    torch.testing.assert_close(SoftTargetLoss()(logits, cb.learn.yb[0]), LabelSmoothingCrossEntropy(0.1)(logits, y))
    cb = MixupCallback(10); cb.learn = L(); cb.learn.xb, cb.learn.yb = (torch.randn(4, 3, 8, 8),), (y,)
    cb.before_batch()
    assert cb.learn.yb[0].shape == (4, 10)
    cb.learn.xb, cb.learn.yb = (torch.randn(3, 3, 8, 8),), (y[:3],)
    with pytest.raises(ValueError, match='even'): cb.before_batch()
    assert SoftTargetLoss(reduction='none')(logits, y).shape == (4,)


def test_topk():
    class L: pass
    lrn = L(); lrn.pred = torch.tensor([[.1, .9, .5, .4, .3, .2], [.9, .1, .5, .4, .3, .2]]); lrn.yb = (torch.tensor([2, 1]),)
    t1, t5 = TopK(1), TopK(5)
    for t in (t1, t5): t.reset(); t.accumulate(lrn)
    assert (t1.value, t5.value) == (0., .5)


# ---------------------------------------------------------------- end to end
class StopAfter(Callback):
    order = 100
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.epoch + 1 >= self.n: raise CancelFitException()


def test_finetune_from_own_checkpoint_save_and_exact_resume(tmp_path, toy):
    mae = fastconvmae_convvit_tiny_patch16(img_size=64, norm_pix_loss=True)
    torch.save({'model': mae.state_dict(), 'epoch': 0}, tmp_path / 'pt.pth')
    kw = dict(epochs=2, warmup_epochs=1, bs=4, num_workers=0, verbose=False)
    full = finetune(toy, 'cpu', checkpoint=tmp_path / 'pt.pth', output_dir=tmp_path / 'full', **kw)
    assert set(results(full)) == {'train_loss', 'valid_loss', 'top1', 'top5', 'skipped_steps', 'valid_scored', 'valid_unreadable'}
    saved = torch.load(tmp_path / 'full' / 'finetuned.pth', weights_only=True)
    assert saved['config']['preset'] == 'cpu' and 'top1' in saved['results']
    finetune(toy, 'cpu', checkpoint=tmp_path / 'pt.pth', output_dir=tmp_path / 'half', cbs=[StopAfter(1)], **kw)
    resumed = finetune(toy, 'cpu', output_dir=tmp_path / 'half', resume=tmp_path / 'half' / 'checkpoint-latest.pth', **kw)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match='unknown settings'): finetune(toy, 'cpu', epocs=3)


def test_gradient_accumulation_scales_lr(toy):
    from fastai.callback.training import GradientAccumulation
    dls = finetune_dls(toy, img_size=64, bs=2, num_workers=0, device='cpu')
    learn = finetune_learner(dls, convvit_tiny_patch16(num_classes=2, img_size=64), blr=1e-3, accum=2)
    assert math.isclose(learn.lr, 1e-3 * 4 / 256) and any(isinstance(c, GradientAccumulation) for c in learn.cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit_warmup_cos(1, warmup_epochs=0.5)


def test_presets_official_recipe():
    o = FINETUNE_PRESETS['official']
    assert (o['model'], o['epochs'], o['warmup_epochs'], o['blr'], o['layer_decay'], o['weight_decay'], o['drop_path']) == \
           ('convvit_base_patch16', 100, 5, 5e-4, 0.65, 0.05, 0.1)
    assert (o['aa'], o['reprob'], o['mixup'], o['cutmix'], o['smoothing'], o['min_lr']) == ('rand-m9-mstd0.5-inc1', 0.25, 0.8, 1.0, 0.1, 1e-6)
    assert o['bs'] * 8 == 1024


def test_cli_help():
    for mod in ['fastconvmae.finetune', 'fastconvmae.linprobe']:
        out = subprocess.run([sys.executable, '-m', mod, '--help'], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and '--pretrained' in out.stdout and 'DATA' in out.stdout, out.stderr[-500:]


# ---------------------------------------------------------------- linear probe
def test_linprobe_model_lars_and_quick_probe(tmp_path, toy):
    m = linprobe_model(convvit_tiny_patch16(num_classes=2, img_size=64))
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ['head.1.weight', 'head.1.bias']
    assert isinstance(m.head[0], nn.BatchNorm1d) and not m.head[0].affine
    w, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = lars([[w, b]], lr=0.5); w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * 1e-3 * w0.norm() / w.grad.norm() * w.grad)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * b.grad)
    mae = fastconvmae_convvit_tiny_patch16(img_size=64)
    torch.save({'model': mae.state_dict()}, tmp_path / 'pt.pth')
    learn = linprobe(toy, 'cpu', checkpoint=tmp_path / 'pt.pth', epochs=1, warmup_epochs=0.5, bs=4, num_workers=0, verbose=False)
    assert torch.equal(learn.model.blocks3[0].attn.qkv.weight, mae.blocks3[0].attn.qkv.weight)
    r = quick_probe(toy, tmp_path / 'pt.pth', img_size=64, bs=4, verbose=False)
    assert r['n_train'] == 8 and r['n_valid'] == 4 and 0 <= r['top1'] <= 1


def test_fit_linear_separable():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 8, generator=g) * 4
    y = torch.arange(400) % 4
    x = c[y] + torch.randn(400, 8, generator=g)
    assert fit_linear(x[:300], y[:300], x[300:], y[300:])['top1'] == 1.0


def test_finetune_cli_ddp_two_processes(tmp_path, toy):
    "torchrun, 2 CPU processes (gloo): trains, sums the metric counts over ranks, rank 0 writes the outputs."
    import os
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', '-m', 'fastconvmae.finetune',
           str(toy), '--epochs', '1', '--warmup_epochs', '0.5', '--bs', '2', '--num_workers', '0', '--precision', 'fp32',
           '--output_dir', str(tmp_path / 'out')]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count('"top1"') == 1   # printed by rank 0 only
    assert (tmp_path / 'out' / 'finetuned.pth').exists() and (tmp_path / 'out' / 'history.csv').exists()


# ---------------------------------------------------------------- issue 8: bad files, EasyCV, MoR, unreadable validation images
class SystemPayload:  # a pickle that would run a shell command if it were ever unpickled fully
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (__import__('os').system, (f'touch {self.marker}',))


def test_bad_files_each_get_one_clear_line(tmp_path, pretrain_sd):
    torch.save({'model': pretrain_sd, 'x': SystemPayload(tmp_path / 'ran')}, tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match=r"global 'posix.system' \(os.system\).*trusted=True") as e:
        load_checkpoint(tmp_path / 'evil.pth')
    assert '\n' not in str(e.value) and not (tmp_path / 'ran').exists()
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'random.pth').write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / 'pickle_junk.pth').write_bytes(b'\x80\x02' + np.random.default_rng(1).bytes(200))
    torch.save({'model': pretrain_sd}, tmp_path / 'ok.pth')
    (tmp_path / 'truncated.pth').write_bytes((tmp_path / 'ok.pth').read_bytes()[:3000])
    for f, what in [('empty.pth', 'is empty'), ('random.pth', 'not a PyTorch checkpoint'), ('pickle_junk.pth', 'not a readable'),
                    ('truncated.pth', 'not a readable checkpoint')]:
        with pytest.raises(BadCheckpointError, match=what) as e: load_checkpoint(tmp_path / f)
        msg = str(e.value)
        assert '\n' not in msg and 'weights_only=False' not in msg and 'Weights only load failed' not in msg, msg


def test_easycv_layouts_use_easycv_names(pretrain_sd):
    easy = as_easycv_pretraining(pretrain_sd)['state_dict']
    assert 'encoder.stage1_output_decode.weight' in easy and 'decoder.decoder_pred.weight' in easy and 'decoder.mask_token' in easy
    sd, dropped, layout = convert_state_dict(easy, target=ConvViT(img_size=64, num_classes=10, **TINY).state_dict())
    assert layout == 'EasyCV pretraining' and 'blocks3.1.attn.qkv.weight' in sd and 'norm.weight' not in sd
    assert sorted(dropped) == ['EasyCV decoder', 'pretraining norm (global-pool classifiers use a new fc_norm)',
                               'pretraining only (decoder, mask token, fusion)']
    assert len(dropped['EasyCV decoder']) == sum(k.startswith(_EASYCV_DECODER) for k in pretrain_sd)
    m = ConvViT(img_size=64, num_classes=10, **TINY)
    rep = load_pretrained(m, as_easycv_pretraining(pretrain_sd), verbose=False)
    assert torch.equal(m.blocks1[0].conv2.weight, pretrain_sd['blocks1.0.conv2.weight']) and len(rep.loaded) == len(sd)


def test_convert_for_other_targets(pretrain_sd):
    "Given the target's state dict, exactly what it has is kept: a backbone without a head, a classifier without global pooling"
    plain = ConvViT(img_size=64, num_classes=0, global_pool=False, **TINY)
    sd, dropped, _ = convert_state_dict(as_easycv_pretraining(pretrain_sd)['state_dict'], target=plain.state_dict())
    assert 'norm.weight' in sd and not any(k.startswith('stage1_output_decode') for k in sd)
    rep = load_pretrained(plain, as_easycv_pretraining(pretrain_sd), verbose=False)
    assert rep.initialised == [] and torch.equal(plain.norm.weight, pretrain_sd['norm.weight'])


@pytest.fixture(scope='module')
def mor_checkpoint(tmp_path_factory): return _mor_checkpoint(tmp_path_factory.mktemp('mor'), **TINY)


def test_mor_checkpoint_student_or_ema_teacher(mor_checkpoint):
    sd = torch.load(mor_checkpoint, weights_only=True)['model']
    assert any(k.startswith('teachers.ema.') for k in sd) and any(k.startswith('decoder_branches.') for k in sd)
    k = 'blocks3.1.mlp.fc2.weight'
    assert not torch.equal(sd[k], sd['teachers.ema.' + k])
    student = ConvViT(img_size=64, num_classes=3, **TINY)
    rep = load_pretrained(student, mor_checkpoint, verbose=False)
    assert rep.layout.startswith('MoR') and torch.equal(student.state_dict()[k], sd[k])
    assert len(rep.dropped['MoR EMA teacher (from_ema=True loads it)']) == sum(k.startswith('teachers.ema.') for k in sd)
    assert len(rep.dropped['MoR decoder branches']) == sum(k.startswith('decoder_branches.') for k in sd)
    teacher = ConvViT(img_size=64, num_classes=3, **TINY)
    rep = load_pretrained(teacher, mor_checkpoint, from_ema=True, verbose=False)
    assert torch.equal(teacher.state_dict()[k], sd['teachers.ema.' + k])
    assert sorted(rep.initialised) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    with pytest.raises(CheckpointMismatchError, match='no EMA teacher'):
        load_pretrained(ConvViT(img_size=64, num_classes=3, **TINY), {'model': ConvViT(**TINY).state_dict()}, from_ema=True)


def _corrupt_val(toy, root):
    "A copy of the toy folder whose first validation image is truncated"
    shutil.copytree(toy, root)
    bad = sorted((root / 'val').rglob('*.jpg'))[0]
    bad.write_bytes(bad.read_bytes()[:1500])
    return root, bad


def test_unreadable_validation_images_are_left_out(tmp_path, toy):
    import warnings
    from fastconvmae.data import BadImageWarning
    root, bad = _corrupt_val(toy, tmp_path / 'd')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', BadImageWarning)
        learn = finetune(root, 'cpu', epochs=1, warmup_epochs=0.5, bs=4, num_workers=0, verbose=False, precision='fp32')
        r = results(learn)
        assert (r['valid_scored'], r['valid_unreadable']) == (3, 1)
        # top-1 is that of the 3 readable images, recomputed by hand
        dl = learn.dls.valid.new(shuffle=False)
        learn.model.eval()
        with torch.no_grad(): xb, yb = [torch.cat(o) for o in zip(*[(b[0], b[1]) for b in dl])]
        ok = yb != -100
        with torch.no_grad(): acc = (learn.model(xb[ok]).argmax(1) == yb[ok]).float().mean().item()
        assert math.isclose(r['top1'], acc, abs_tol=1e-6) and learn.valid_unreadable == 1
        q = quick_probe(root, img_size=64, bs=4, verbose=False)
    assert (q['n_valid'], q['valid_unreadable'], q['n_train'], q['train_unreadable']) == (3, 1, 8, 0)
