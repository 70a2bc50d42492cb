"""Mixture of Reconstructors (fastconvmae.mor).

Offline: the DINO and CLIP teachers are tiny RANDOMLY INITIALISED stand-ins built from the real timm
configurations (`vit_base_patch16_224.dino`, `vit_base_patch16_clip_quickgelu_224.openai`, with CLIP's
mean/std and QuickGELU) shrunk to 1 block of width 64. Nothing is downloaded.
"""
import os, subprocess, sys
from functools import partial
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # belt and braces: nothing here may download
import pytest, torch, torch.nn as nn
from dataclasses import replace
from fastai.callback.core import Callback, CancelStepException
from fastconvmae.models import MaskedAutoencoderConvViT, rel_err
from fastconvmae.pretrain import pretrain_param_groups, fit_pretrain, load_checkpoint
from fastconvmae.data import pretrain_dls
from fastconvmae.mor import (MaskedAutoencoderConvViTMoR, TEACHERS, MOR_PRESETS, timm_teacher, ema_momentum, branch_params,
                             shared_params, mor_learner, EMAUpdate)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=64, embed_dim=(32, 48, 96), depth=(1, 1, 2), num_heads=4, decoder_embed_dim=64, decoder_depth=4,
            decoder_num_heads=4, norm_pix_loss=True)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny models on a shared 2-core machine: one thread is faster than two fighting other jobs for the cores."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def standin(which):
    "A random-init stand-in for the DINO / CLIP teacher: the real timm config, 1 block of width 64."
    return timm_teacher(TEACHERS[which], random_init=True, depth=1, embed_dim=64, num_heads=2)


@pytest.fixture(scope='module')
def teachers(): return dict(dino=standin('dino'), clip=standin('clip'))


def mor4(teachers, complementary=True, **kw):
    torch.manual_seed(0)
    return MaskedAutoencoderConvViTMoR(targets=('pixel', 'ema', 'dino', 'clip'), teachers=teachers,
                                       complementary=complementary, **{**TINY, **kw})


def tiny_dls(bs=2):
    return pretrain_dls(REPO / 'data', img_size=64, bs=bs, num_workers=0, valid=2, seed=0)


# --- the pixel-only configuration is the official model -------------------------------------------

@pytest.mark.parametrize('name,complementary', [('official_convmae_tiny', False), ('official_fastconvmae_tiny', True)])
def test_pixel_only_parity_with_official_fixtures(fixtures_dir, name, complementary):
    d = torch.load(fixtures_dir / f'{name}.pt', weights_only=False)
    c = d['config']
    m = MaskedAutoencoderConvViTMoR(
        targets=('pixel',), shared_depth=c['decoder_depth'], img_size=c['img_size'], patch_size=c['patch_size'],
        embed_dim=c['embed_dim'], depth=c['depth'], num_heads=c['num_heads'], decoder_embed_dim=c['decoder_embed_dim'],
        decoder_depth=c['decoder_depth'], decoder_num_heads=c['decoder_num_heads'], mlp_ratio=c['mlp_ratio'],
        norm_pix_loss=c['norm_pix_loss'], norm_layer=partial(nn.LayerNorm, eps=c['norm_layer_eps']), complementary=complementary)
    assert (m.shared_depth, m.branch_depth) == (c['decoder_depth'], 0)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {k: tuple(v.shape) for k, v in d['state_dict'].items()}
    m.load_state_dict(d['state_dict'], strict=True)
    loss, pred, mask = m(d['imgs'], mask_ratio=c['mask_ratio'], noise=d['noise'])
    assert torch.equal(mask, d['mask'])
    assert rel_err(loss.detach(), d['loss']) < 1e-5 and rel_err(pred.detach(), d['pred']) < 1e-5
    loss.backward()
    for k, g in d['grads'].items(): assert rel_err(m.get_parameter(k).grad, g) < 1e-5, k


@pytest.mark.parametrize('complementary', [False, True])
@pytest.mark.parametrize('S', [4, 1])
def test_pixel_only_equals_plain_model(complementary, S):
    torch.manual_seed(0); plain = MaskedAutoencoderConvViT(complementary=complementary, **TINY)
    torch.manual_seed(0); mor = MaskedAutoencoderConvViTMoR(targets=('pixel',), shared_depth=S, complementary=complementary, **TINY)
    a, b = plain.state_dict(), mor.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # same names, same init from the same seed
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    (l1, p1, m1), (l2, p2, m2) = plain(imgs, noise=noise), mor(imgs, noise=noise)
    assert torch.equal(l1, l2) and torch.equal(p1, p2) and torch.equal(m1, m2)
    l1.backward(); l2.backward()
    pa, pb = dict(plain.named_parameters()), dict(mor.named_parameters())
    assert all((pa[k].grad is None) == (pb[k].grad is None) and (pa[k].grad is None or torch.equal(pa[k].grad, pb[k].grad)) for k in pa)


# --- PS-Decoder: gradient isolation ----------------------------------------------------------------

def test_gradient_isolation(teachers):
    m = mor4(teachers)
    o = m.forward_all(torch.randn(2, 3, 64, 64))
    shared = shared_params(m)
    def reached(loss, named):
        gs = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
        return {n: g is not None and g.abs().sum().item() > 0 for (n, _), g in zip(named, gs)}
    for t in m.targets:
        assert all(reached(o.losses[t], branch_params(m, t)).values()), t
        for u in m.targets:
            if u != t:  # no path at all (autograd returns None) into another target's branch
                gs = torch.autograd.grad(o.losses[t], [p for _, p in branch_params(m, u)], retain_graph=True, allow_unused=True)
                assert all(g is None for g in gs), (t, u)
        r = reached(o.losses[t], shared)
        assert all(v for n, v in r.items() if n.startswith(('decoder_', 'blocks3', 'mask_token'))), (t, [n for n, v in r.items() if not v])
    names = [n for n, _ in shared]
    assert 'decoder_blocks.0.attn.qkv.weight' in names and 'decoder_blocks.3.attn.qkv.weight' not in names  # S = 3 of 4
    assert not any(n.startswith(('teachers', 'decoder_branches', 'decoder_pred', 'decoder_norm')) for n in names)


# --- teachers are frozen ---------------------------------------------------------------------------

def test_teachers_frozen(teachers, tmp_path):
    m = mor4(teachers).train()
    ema, hidden = m.teachers['ema'], [teachers['dino'].vit, teachers['clip'].vit]
    assert not any(p.requires_grad for p in ema.parameters()) and not any(p.requires_grad for v in hidden for p in v.parameters())
    assert not any(x.training for x in ema.modules()) and not any(x.training for v in hidden for x in v.modules())
    assert m.decoder_branches['dino'].training
    o = m.forward_all(torch.randn(2, 3, 64, 64))
    o.loss.backward()
    assert all(p.grad is None for p in ema.parameters()) and all(p.grad is None for v in hidden for p in v.parameters())
    assert not any(t.requires_grad for t in o.targets.values())
    # not in the optimizer: timm's groups skip requires_grad=False, the hidden ViTs are not parameters at all
    frozen = {id(p) for p in ema.parameters()} | {id(p) for v in hidden for p in v.parameters()}
    in_groups = {id(p) for g in pretrain_param_groups(m) for p in g['params']}
    assert not in_groups & frozen and in_groups == {id(p) for p in m.parameters() if p.requires_grad}
    learn = mor_learner(tiny_dls(), replace(MOR_PRESETS['cpu_mor'], img_size=64, bs=2), model=m, output=tmp_path,
                        figures=False, log=False, save_every=0)
    learn.create_opt()
    assert not {id(p) for pl in learn.opt.param_lists for p in pl} & frozen
    # saved: the EMA teacher; not saved: DINO, CLIP
    sd = m.state_dict()
    assert any(k.startswith('teachers.ema.blocks3.') for k in sd)
    assert not any(k.startswith(('teachers.dino', 'teachers.clip')) or '.vit.' in k for k in sd)
    m.load_state_dict(sd, strict=True)
    # the hidden ViTs follow the model's dtype / device moves
    m.to(torch.bfloat16)
    assert next(teachers['dino'].vit.parameters()).dtype == torch.bfloat16
    m.float()
    assert next(teachers['dino'].vit.parameters()).dtype == torch.float32


def test_teacher_needs_a_weight_source_and_targets_need_teachers():
    with pytest.raises(ValueError, match='say where the weights'): timm_teacher(TEACHERS['clip'])
    with pytest.raises(FileNotFoundError): timm_teacher(TEACHERS['clip'], weights='/nonexistent/clip.bin')
    with pytest.raises(ValueError, match='needs a tokenizer'): MaskedAutoencoderConvViTMoR(targets=('pixel', 'clip'), **TINY)


def test_teacher_weights_from_local_file(tmp_path):
    a = standin('clip')
    torch.save(a.vit.state_dict(), tmp_path / 'clip.pth')
    b = timm_teacher(TEACHERS['clip'], weights=tmp_path / 'clip.pth', depth=1, embed_dim=64, num_heads=2)
    sa, sb = a.vit.state_dict(), b.vit.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the EMA teacher -------------------------------------------------------------------------------

def test_ema_update_formula():
    m = MaskedAutoencoderConvViTMoR(targets=('pixel', 'ema'), **TINY)
    t, s = m.teachers['ema'], dict(m.named_parameters())
    assert all(torch.equal(p, s[n]) for n, p in t.named_parameters())  # starts as an exact copy
    with torch.no_grad():
        for n, p in t.named_parameters(): s[n].add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in t.named_parameters()}
    m.update_ema(0.9)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * s[n], rtol=1e-6, atol=1e-6)
    assert ema_momentum(0.) == pytest.approx(0.996) and ema_momentum(.5) == pytest.approx(0.998) and ema_momentum(1.) == 1.
    assert ema_momentum(0., 0.99, 0.999) == pytest.approx(0.99)


def test_ema_callback_updates_after_each_real_step_only(tmp_path):
    class Spy(Callback):
        order = 100  # after EMAUpdate
        def before_fit(self): self.snaps, self.ms, self.updates = [], [], 0
        def after_step(self):
            self.snaps.append(self.model.blocks3[0].attn.qkv.weight.detach().clone())
            self.ms.append(self.learn.ema_momentum)
    torch.manual_seed(0)
    r = replace(MOR_PRESETS['cpu_mor'], img_size=64, bs=2, epochs=2, warmup_epochs=1, blr=5e-3, targets=('pixel', 'ema'))
    learn = mor_learner(tiny_dls(), r, model=MaskedAutoencoderConvViTMoR(targets=('pixel', 'ema'), **TINY),
                        output=tmp_path, figures=False, log=False, save_every=0)
    t0 = learn.model.teachers['ema'].blocks3[0].attn.qkv.weight.clone()
    spy = Spy()
    with learn.no_logging(), learn.no_bar(): fit_pretrain(learn.add_cb(spy))
    assert spy.ms == pytest.approx([ema_momentum(i / 4) for i in range(4)], abs=1e-12)  # 2 epochs x 2 steps
    t = t0
    for s, mom in zip(spy.snaps, spy.ms): t = mom * t + (1 - mom) * s
    torch.testing.assert_close(learn.model.teachers['ema'].blocks3[0].attn.qkv.weight, t, rtol=1e-6, atol=1e-6)

    # a cancelled step (as the fp16 scaler cancels one after an overflow) must not move the teacher
    class CancelOdd(Callback):
        def before_step(self):
            if self.iter % 2: raise CancelStepException()
    calls = []
    real = learn.model.update_ema
    learn.model.update_ema = lambda mom: (calls.append(mom), real(mom))
    try:
        with learn.no_logging(), learn.no_bar(): learn.fit(2, cbs=CancelOdd())
    finally: del learn.model.update_ema
    assert len(calls) == 2  # 4 batches, 2 real steps


def test_resume_restores_the_ema_teacher(tmp_path):
    "2 epochs straight = 1 epoch, stop, resume from the checkpoint: same EMA teacher (it is in the checkpoint's model)."
    from fastai.callback.core import CancelFitException
    r = replace(MOR_PRESETS['cpu_mor'], img_size=64, bs=2, epochs=2, warmup_epochs=1, blr=5e-3, targets=('pixel', 'ema'))
    def run(out, resume=None, stop_after=None):
        torch.manual_seed(0)
        learn = mor_learner(tiny_dls(), r, model=MaskedAutoencoderConvViTMoR(targets=('pixel', 'ema'), **TINY),
                            output=out, figures=False, log=False)
        if stop_after:
            class Kill(Callback):
                order = 100
                def after_epoch(self):
                    if self.epoch + 1 == stop_after: raise CancelFitException()
            learn.add_cb(Kill())
        with learn.no_logging(), learn.no_bar(): fit_pretrain(learn, resume=resume)
        return {k: v.clone() for k, v in learn.model.state_dict().items() if k.startswith('teachers.ema.')}
    straight = run(tmp_path / 'a')
    first = run(tmp_path / 'b', stop_after=1)
    resumed = run(tmp_path / 'b', resume=tmp_path / 'b' / 'checkpoint-latest.pth')
    assert straight.keys() == resumed.keys() and len(straight) > 10
    assert max((straight[k] - first[k]).abs().max().item() for k in straight) > 0  # the second epoch moved the teacher
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6


# --- both maskings, targets once per image -----------------------------------------------------------

@pytest.mark.parametrize('complementary', [False, True])
def test_both_maskings_targets_once_per_image(teachers, complementary):
    m = mor4(teachers, complementary=complementary)
    seen = []
    h = teachers['clip'].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try: loss, pred, mask = m(torch.randn(3, 3, 64, 64))
    finally: h.remove()
    K = 4 if complementary else 1
    assert pred.shape == (K * 3, 16, 768) and mask.shape == (K * 3, 16) and torch.isfinite(loss)
    assert seen == [3]  # one teacher pass on the 3 images, not on the K x 3 views
    assert set(m.last_losses) == {'pixel', 'ema', 'dino', 'clip'}
    w = m.loss_weights
    assert loss.item() == pytest.approx(sum(w[t] * m.last_losses[t].item() for t in m.targets), rel=1e-6)


def test_without_pixels(teachers):
    m = MaskedAutoencoderConvViTMoR(targets=('ema', 'dino'), weights=(1., .5), teachers=teachers, **TINY)
    assert not hasattr(m, 'decoder_pred') and len(m.decoder_blocks) == m.shared_depth
    loss, pred, mask = m(torch.randn(2, 3, 64, 64))
    assert pred.shape == (2, 16, 96) and m.main_target == 'ema' and m.loss_weights == {'ema': 1., 'dino': .5}


# --- command line ------------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path):
    "The one pretraining command with pixel + EMA + a random-init timm ViT-Ti as the DINO stand-in (--random_teachers), one epoch."
    base = [str(Path(sys.executable).with_name('fastconvmae_pretrain')), '--data', str(REPO / 'data'), '--targets', 'pixel,ema,dino',
            '--weights', '1,1,0.5', '--random_teachers', '--dino_model', 'vit_tiny_patch16_224', '--img_size', '64',
            '--bs', '5', '--workers', '0', '--precision', 'auto', '--output', str(tmp_path)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    p = subprocess.run(base + ['--epochs', '1'], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'pixelx1+emax1+dinox0.5' in p.stdout
    header = (tmp_path / 'log.csv').read_text().splitlines()[0]
    assert header.startswith('epoch,train_loss,train_loss_pixel,train_loss_ema,train_loss_dino,valid_loss')
    ck = load_checkpoint(tmp_path / 'checkpoint-latest.pth')
    assert ck['epoch'] == 0 and tuple(ck['recipe']['targets']) == ('pixel', 'ema', 'dino')
    assert any(k.startswith('teachers.ema.') for k in ck['model']) and not any(k.startswith('teachers.dino') for k in ck['model'])


def test_cli_argument_errors():
    from fastconvmae.mor import recipe_from_args, _split
    from fastconvmae.cli import UserError
    with pytest.raises(UserError, match='unknown targets'): recipe_from_args('cpu', targets=_split('pixel,sift'))
    with pytest.raises(UserError, match='1 --weights for 2 targets'): recipe_from_args('cpu_mor', weights=_split('1', float))
    with pytest.raises(UserError, match='unknown preset'): recipe_from_args('huge')
    r = recipe_from_args('fastconvmae_base_ct', targets=_split('pixel, clip'), weights=_split('1,0.5', float), shared_depth=4)
    assert r.targets == ('pixel', 'clip') and r.weights == (1., .5) and r.shared_depth == 4 and r.epochs == 50


def test_ct_preset_follows_the_official_figure():
    "The official C+T depiction has three tokenizers (EMA, DINO, CLIP) and no pixel branch; pixels are our variant."
    from fastconvmae.mor import MOR_PRESETS
    assert MOR_PRESETS['fastconvmae_base_ct'].targets == ('ema', 'dino', 'clip')
    assert MOR_PRESETS['fastconvmae_base_ct_pixel'].targets == ('pixel', 'ema', 'dino', 'clip')
