"Semantic segmentation: data, augmentation geometry, UperNet, inference, metrics, recipe, training/resume and the CLI."
import json, math, os, subprocess, sys, warnings
from dataclasses import replace
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from fastconvmae.segmentation import *
from fastconvmae.segmentation import _pair
from fastconvmae.data import BadImageWarning
from fastai.callback.core import Callback, CancelFitException

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent/'shared'/'data'/'camvid'
BIN = Path(sys.executable).parent


class Pyramid(nn.Module):
    "Stand-in multi-scale backbone (strides 4-32) for head-level tests; not a ConvViT"
    def __init__(self, chs=(8, 12, 16, 16)):
        super().__init__()
        self.out_channels = chs
        self.convs = nn.ModuleList([nn.Conv2d(3, chs[0], 4, 4)] + [nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(chs, chs[1:])])
    def forward(self, x):
        out = []
        for c in self.convs: x = F.gelu(c(x)); out.append(x)
        return out


def toy_net(k=5, **kw):
    torch.manual_seed(0)
    return UperNet(Pyramid(), k, channels=16, aux_channels=8, **kw).eval()


def make_ade(root: Path, n_train=6, n_val=3, size=(64, 48), k=3, seed=0):
    "A tiny ADE20K-layout folder: random blobs of k classes (labels 1..k, 0 = unlabelled) on matching colours"
    rng = np.random.default_rng(seed)
    for split, n in (('training', n_train), ('validation', n_val)):
        (root/'images'/split).mkdir(parents=True, exist_ok=True); (root/'annotations'/split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size
            lbl = np.zeros((h, w), np.uint8)
            for c in range(1, k + 1):
                y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
                lbl[y:y + rng.integers(8, 24), x:x + rng.integers(8, 24)] = c
            img = (np.stack([lbl * 70, 255 - lbl * 60, (lbl % 2) * 200], -1) + rng.integers(0, 20, (h, w, 3))).clip(0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root/'images'/split/f'{i:03d}.jpg')
            Image.fromarray(lbl).save(root/'annotations'/split/f'{i:03d}.png')
    (root/'classes.txt').write_text('\n'.join(f'c{i}' for i in range(k)) + '\n')
    return root


# ---------------------------------------------------------------- metrics
def test_perfect_prediction_miou_one():
    y = torch.randint(0, 4, (3, 20, 30))
    s = seg_scores(confusion_matrix(y, y, 4))
    assert s['mIoU'] == 1.0 and s['aAcc'] == 1.0 and s['mAcc'] == 1.0


def test_ignore_pixels_never_count():
    y = torch.randint(0, 4, (2, 20, 30)); y[:, :7] = 255
    bad = torch.where(y == 255, (y + 1) % 4, y)  # wrong only where ignored
    cm = confusion_matrix(bad, y, 4)
    assert cm.sum() == (y != 255).sum() and seg_scores(cm)['mIoU'] == 1.0
    worse = torch.where(y == 255, y, (y + 1) % 4)
    assert seg_scores(confusion_matrix(worse, y, 4))['mIoU'] == 0.0


def test_iou_values_and_absent_classes():
    y = torch.tensor([[0, 0, 1, 1]]); p = torch.tensor([[0, 1, 1, 1]])
    s = seg_scores(confusion_matrix(p, y, 3))
    assert s['IoU'][0] == pytest.approx(0.5) and s['IoU'][1] == pytest.approx(2 / 3) and math.isnan(s['IoU'][2])
    assert s['mIoU'] == pytest.approx((0.5 + 2 / 3) / 2) and s['aAcc'] == pytest.approx(0.75)


def test_metric_accumulates_a_confusion_matrix_not_batch_means():
    class L: pass
    m = SegConfusion(2); m.reset()
    ys = [torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long)]
    ys[1][0, 0, 0] = 0
    preds = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)]  # class 0 everywhere
    preds[0][:, 0] = 1; preds[1][:, 0] = 1
    for p, y in zip(preds, ys):
        l = L(); l.pred, l.yb = p, (y,); m.accumulate(l)
    whole = seg_scores(confusion_matrix(torch.zeros(2, 4, 4, dtype=torch.long), torch.cat(ys), 2))
    assert m.value == pytest.approx(whole['mIoU'])
    per_batch = np.nanmean([seg_scores(confusion_matrix(torch.zeros_like(y), y, 2))['mIoU'] for y in ys])
    assert m.value != pytest.approx(per_batch)


# ---------------------------------------------------------------- inference
def test_sliding_window_covering_image_equals_whole():
    net, x = toy_net(), torch.randn(2, 3, 64, 96)
    whole = net.encode_decode(x)
    assert torch.allclose(slide_inference(net, x, crop=(64, 96), stride=(40, 40)), whole, atol=1e-5)
    assert torch.allclose(slide_inference(net, x, crop=512, stride=341), whole, atol=1e-5)
    net.test_cfg = dict(mode='slide', crop=512, stride=341)
    assert torch.allclose(net(x), whole, atol=1e-5)


def test_slide_grid_official():
    assert slide_windows(512, 683, (512, 512), (341, 341)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    ws = slide_windows(700, 1000, (512, 512), (341, 341))
    cover = np.zeros((700, 1000), int)
    for y1, y2, x1, x2 in ws: assert (y2 - y1, x2 - x1) == (512, 512); cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1 and len(ws) == 2 * 3


def test_slide_averages_overlaps_and_flip():
    net, x = toy_net(), torch.randn(1, 3, 64, 96)
    out = slide_inference(net, x, crop=64, stride=32)
    assert out.shape == (1, 5, 64, 96)
    assert not torch.allclose(out, net.encode_decode(x), atol=1e-3)  # windows see less context than the whole image
    lp = seg_inference(net, x, 'whole', flip=True)
    assert torch.allclose(lp.exp().sum(1), torch.ones(1, 64, 96), atol=1e-5)
    with pytest.raises(ValueError, match="'whole' or 'slide'"): seg_inference(net, x, 'tiles')


def test_upernet_any_size_and_training_outputs():
    net = toy_net().train()
    main, aux = net(torch.randn(2, 3, 64, 64))
    assert main.shape == aux.shape == (2, 5, 64, 64)
    net.eval()
    assert net(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)
    names = [n for n, _ in net.named_parameters()]
    assert 'decode_head.psp_modules.3.1.conv.weight' in names and 'decode_head.fpn_bottleneck.bn.weight' in names
    assert 'auxiliary_head.convs.0.conv.weight' in names and 'decode_head.conv_seg.bias' in names


def test_loss_ignore_and_aux_weight():
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8)); y[:, :4] = 255
    ce = F.cross_entropy(logits, y, ignore_index=255, reduction='none')
    assert SegLoss()(logits, y) == pytest.approx(ce.mean().item(), rel=1e-5)  # mmseg 0.11: mean over all pixels
    assert SegLoss(avg_non_ignore=True)(logits, y) == pytest.approx(F.cross_entropy(logits, y, ignore_index=255).item(), rel=1e-5)
    both = SegLoss(aux_weight=0.4)((logits, aux), y)
    assert both == pytest.approx((ce.mean() + 0.4 * F.cross_entropy(aux, y, ignore_index=255, reduction='none').mean()).item(), rel=1e-5)
    changed = logits.clone(); changed[:, :, :4] += 100 * torch.randn(2, 3, 4, 8)
    assert SegLoss(avg_non_ignore=True)(changed, y) == pytest.approx(SegLoss(avg_non_ignore=True)(logits, y).item(), rel=1e-5)


# ---------------------------------------------------------------- data
def test_dataset_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'): SegDataset(tmp_path/'nope')
    (tmp_path/'images'/'training').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='ADE20K layout'): SegDataset(tmp_path)
    (tmp_path/'annotations'/'training').mkdir(parents=True)
    with pytest.raises(ValueError, match='no images'): SegDataset(tmp_path)


def test_dataset_reduce_zero_label_and_bad_files(tmp_path):
    root = make_ade(tmp_path/'d', n_train=4, k=3)
    ds = SegDataset(root, 'training')
    raw = np.array(Image.open(root/'annotations'/'training'/'000.png'))
    img, lbl = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 64) and lbl.shape == (48, 64)
    assert torch.equal(lbl, torch.from_numpy(np.where(raw == 0, 255, raw.astype(np.int64) - 1)))
    assert ds.classes == ['c0', 'c1', 'c2']
    (root/'images'/'training'/'001.jpg').write_bytes(b'not a jpeg')                       # corrupt image
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root/'annotations'/'training'/'002.png')  # label of another size
    (root/'images'/'training'/'009.jpg').write_bytes((root/'images'/'training'/'000.jpg').read_bytes())  # no label map
    with pytest.warns(UserWarning, match='no label map'): ds = SegDataset(root, 'training')
    assert len(ds) == 4
    with pytest.warns(BadImageWarning):
        items = [ds[i] for i in range(len(ds))]  # 1 skips 001 and 002, 2 skips 002 again
    assert ds.n_skipped == 3 and sorted(p.name for p in ds.bad_files) == ['001.jpg', '002.jpg']
    assert all(x.shape[-2:] == y.shape for x, y in items)


def test_class_names(tmp_path):
    (tmp_path/'objectInfo150.txt').write_text('Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n'
                                             '2\t0.1072\t6046\t612\tbuilding;edifice\n')
    assert read_classes(tmp_path) == ['wall', 'building']  # ADE20K's own list
    (tmp_path/'classes.txt').write_text('sky\nroad\n\n')
    assert read_classes(tmp_path) == ['sky', 'road']


def test_train_transform_same_geometry_for_image_and_label():
    torch.manual_seed(0)
    lbl = torch.randint(0, 5, (6, 8)).repeat_interleave(10, 0).repeat_interleave(10, 1)  # 60 x 80 blocks
    lbl[:10] = 255
    img = torch.stack([lbl * 40 % 256, (lbl * 3) % 256, torch.full_like(lbl, 7)]).to(torch.uint8)
    tfm = SegTrainTransform(crop=48, scale=(80, 60), ratio_range=(1., 1.), photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    flips = set()
    for _ in range(20):
        x, y = tfm(img, lbl)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.long
        assert torch.equal((x[0] * 255).round().long(), y * 40 % 256)  # the colour still encodes the label
        flips.add(bool((y[:, 0] != y[:, -1]).any()))
    big = SegTrainTransform(crop=96, scale=(80, 60), ratio_range=(1., 1.), photometric=False)  # crop > image: padded
    x, y = big(img, lbl)
    assert x.shape == (3, 96, 96) and (y[60:] == 255).all() and (y[:, 80:] == 255).all() and (x[:, 60:] == 0).all()


def test_rescale_and_photometric():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(360, 480, (2048, 512)) == (512, 683)
    assert rescale_size(1000, 3000, (2048, 512)) == (512, 1536) and rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    lbl = torch.randint(0, 4, (30, 40))
    _, l2 = resize_pair(torch.zeros(3, 30, 40, dtype=torch.uint8), lbl, (61, 83))
    assert set(l2.unique().tolist()) <= set(lbl.unique().tolist())  # nearest: no new label values
    torch.manual_seed(0)
    img = torch.rand(3, 16, 16)
    outs = [photometric_distortion(img) for _ in range(20)]
    assert all(o.shape == img.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert sum(not torch.allclose(o, img) for o in outs) >= 15


def test_cat_max_ratio_avoids_single_class_crops():
    lbl = torch.zeros(100, 100, dtype=torch.long); lbl[:, 80:] = 1
    ok = lambda b: (lbl[b[0]:b[0] + b[2], b[1]:b[1] + b[3]] == 0).float().mean() < 0.75
    torch.manual_seed(0)
    with_ratio = np.mean([ok(random_crop_box(lbl, (40, 40), 0.75)) for _ in range(200)])
    without = np.mean([ok(random_crop_box(lbl, (40, 40), 1.0)) for _ in range(200)])
    assert with_ratio > 0.7 and without < 0.3


def test_loaders_iterations_and_sharding(tmp_path):
    root = make_ade(tmp_path/'d', n_train=5, n_val=5)
    ds = SegDataset(root, 'training')
    dls = [IterDL(ds, 7, seed=1, bs=2, shuffle=True, rank=r, world_size=2) for r in range(2)]
    assert len(dls[0]) == 7
    a, b = dls[0].get_idxs(), dls[1].get_idxs()
    assert len(a) == len(b) == 14
    one = IterDL(ds, 7, seed=1, bs=4, shuffle=True).get_idxs()
    assert [i for k in range(7) for i in a[2 * k:2 * k + 2] + b[2 * k:2 * k + 2]] == one  # global batches split by rank
    dls[0].set_epoch(1); assert dls[0].get_idxs() != a
    v = SegDataset(root, 'validation')
    parts = [ValidDL(v, bs=2, shuffle=False, rank=r, world_size=2).get_idxs() for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(5)) and len(ValidDL(v, bs=2, rank=0, world_size=2)) == 2


# ---------------------------------------------------------------- recipe
def test_poly_schedule():
    f = poly_lr(np.array([1e-4, 1e-5]), 160_000, 1500)
    assert f(0) == pytest.approx([1e-10, 1e-11])
    assert f(750 / 160_000) == pytest.approx(np.array([1e-4, 1e-5]) * (1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)))
    assert f(80_000 / 160_000) == pytest.approx([5e-5, 5e-6]) and f(1.0) == pytest.approx([0, 0])


def test_presets_official():
    r = SEG_PRESETS['ade20k']
    assert (r.crop, r.scale, r.bs * r.devices, r.iters, r.warmup_iters, r.lr, r.weight_decay, r.layer_decay) == \
           (512, (2048, 512), 16, 160_000, 1500, 1e-4, 0.05, 0.75)
    assert (r.channels, r.aux_channels, r.aux_weight, r.drop_path, r.test_mode, r.test_crop, r.test_stride) == \
           (768, 256, 0.4, 0.2, 'slide', 512, 341)


# ---------------------------------------------------------------- with the ConvViT backbone
backbone = pytest.importorskip('fastconvmae.backbone')
TINY = dict(crop=64, scale=(64, 48), bs=2, iters=4, eval_interval=2, warmup_iters=1, channels=16, aux_channels=8,
            precision='fp32', valid_bs=1, test_mode='whole')


def test_layer_ids_and_groups():
    m = create_segmentor(replace(SEG_PRESETS['cpu'], **TINY), 3)
    L = len(m.backbone.blocks3)
    assert seg_layer_id('backbone.patch_embed1.proj.weight', L) == 0 and seg_layer_id('backbone.blocks2.0.conv1.weight', L) == 0
    assert seg_layer_id('backbone.pos_embed', L) == 0 and seg_layer_id('backbone.blocks3.2.attn.qkv.weight', L) == 3
    assert seg_layer_id('decode_head.conv_seg.weight', L) == L + 1 and seg_layer_id('auxiliary_head.convs.0.conv.weight', L) == L + 1
    g = seg_param_groups(m, 0.75, 0.05)
    ids = {n: lid for names, lid in zip(g.names, g.layer_ids) for n in names}
    for i in range(L):  # official: each block's relative-position table trains in its block's layer (and is decayed)
        assert ids[f'backbone.blocks3.{i}.attn.relative_position_bias_table'] == i + 1
    assert sum(len(p) for p in g.params) == sum(1 for p in m.parameters() if p.requires_grad)
    for names, scale, wd, lid in zip(g.names, g.lr_scales, g.wds, g.layer_ids):
        assert scale == pytest.approx(0.75 ** (L + 1 - lid))
        assert all((wd == 0) == (n.endswith('.bias') or dict(m.named_parameters())[n].ndim == 1) for n in names)


def test_sliding_equals_whole_with_backbone():
    m = create_segmentor(replace(SEG_PRESETS['cpu'], **TINY), 3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(slide_inference(m, x, crop=(64, 96), stride=32), m.encode_decode(x), atol=1e-5)


class Interrupt(Callback):
    "Stop the fit after the first epoch, once its checkpoint is written"
    order = 100
    def after_epoch(self): raise CancelFitException()


def _train(root, out, **kw):
    return segment(root, 'cpu', output=out, num_workers=0, device='cpu', verbose=False, **{**TINY, **kw})


def test_train_checkpoint_and_exact_resume(tmp_path):
    root = make_ade(tmp_path/'d')
    full = _train(root, tmp_path/'full')
    assert (tmp_path/'full'/'segmenter.pth').exists() and (tmp_path/'full'/'checkpoint-latest.pth').exists()
    part = _train(root, tmp_path/'part', cbs=[Interrupt()])  # stopped after the first evaluation interval...
    ck = torch.load(tmp_path/'part'/'checkpoint-latest.pth', weights_only=True)
    assert ck['epoch'] == 0
    res = _train(root, tmp_path/'part', resume=tmp_path/'part'/'checkpoint-latest.pth', force_resume=False)
    a, b = full.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed run differs from the uninterrupted one'
    model, rec = load_segmenter(tmp_path/'full'/'segmenter.pth')
    s = evaluate_segmenter(model, root, scale=rec['recipe']['scale'])
    assert 0 <= s['mIoU'] <= 1 and len(s['IoU']) == 3 and s['n_images'] == 3


def test_num_classes_without_class_names(tmp_path):
    root = make_ade(tmp_path/'d'); (root/'classes.txt').unlink()
    with pytest.raises(ValueError, match='num_classes'): _train(root, None, fit=False)
    learn = _train(root, None, fit=False, num_classes=3)
    assert learn.classes == ['class 0', 'class 1', 'class 2'] and learn.model.num_classes == 3


def test_accumulation_counts_optimiser_steps(tmp_path):
    from fastai.callback.training import GradientAccumulation
    learn = _train(make_ade(tmp_path/'d'), None, fit=False, accum=3)
    assert len(learn.dls.train) == TINY['eval_interval'] * 3  # batches per evaluation interval = steps x accumulation
    assert any(isinstance(cb, GradientAccumulation) and cb.n_acc == 2 * 3 for cb in learn.cbs)


def _cli(*args, cwd=None):
    return subprocess.run([str(BIN/'fastconvmae_segment'), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_cli_train_evaluate_predict(tmp_path):
    root = make_ade(tmp_path/'d')
    out = tmp_path/'run'
    small = ['--crop', 64, '--scale', '64,48', '--bs', 2, '--iters', 2, '--eval_interval', 2, '--warmup_iters', 1,
             '--channels', 16, '--aux_channels', 8, '--precision', 'fp32', '--workers', 0]
    r = _cli('train', root, '--output', out, *small)
    assert r.returncode == 0, r.stderr
    assert 'mIoU' in json.loads(r.stdout.strip().splitlines()[-1])
    r = _cli('evaluate', root, '--checkpoint', out/'segmenter.pth', '--mode', 'slide', '--flip')
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1]); assert 0 <= s['mIoU'] <= 1 and s['test_cfg']['flip'] is True
    # two processes (torchrun, Gloo): each scores its share, the confusion matrices are summed: the same numbers
    r2 = subprocess.run([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', '2', '-m', 'fastconvmae.segmentation', 'evaluate', str(root),
                         '--checkpoint', str(out/'segmenter.pth'), '--mode', 'slide', '--flip'], capture_output=True, text=True,
                        timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r2.returncode == 0, r2.stderr
    s2 = json.loads(r2.stdout.strip().splitlines()[-1])
    assert s2['mIoU'] == pytest.approx(s['mIoU'], abs=1e-9) and s2['aAcc'] == pytest.approx(s['aAcc'], abs=1e-9)
    r = _cli('predict', root/'images'/'validation', '--checkpoint', out/'segmenter.pth', '--output', tmp_path/'pred')
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path/'pred').glob('*.png')) == ['000.png', '001.png', '002.png']
    before = {f.name: f.read_bytes() for f in (tmp_path/'pred').iterdir()}
    r = _cli('predict', root/'images'/'validation', '--checkpoint', out/'segmenter.pth', '--output', tmp_path/'pred')
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'already holds' in r.stderr and '--overwrite' in r.stderr, r.stderr
    assert {f.name: f.read_bytes() for f in (tmp_path/'pred').iterdir()} == before   # earlier figures are never replaced silently
    r = _cli('predict', root/'images'/'validation', '--checkpoint', out/'segmenter.pth', '--output', tmp_path/'pred', '--overwrite')
    assert r.returncode == 0, r.stderr


def test_cli_user_errors(tmp_path, capsys):
    root = make_ade(tmp_path/'d')
    r = _cli('train', tmp_path/'nope')  # through the console script: one line, status 2
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'not found' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    from fastconvmae.segmentation import main
    for args, kw, msg in [(('fly', root), {}, 'command'), (('train', root), dict(bs=0), '--bs'), (('train', root), dict(preset='big'), 'preset'),
                          (('train', root), dict(scale='512'), '--scale'), (('train', root), dict(crop=100), '--crop'),
                          (('train', root), dict(iters=3, eval_interval=2), 'must be a multiple of --eval_interval'),
                          (('evaluate', root), {}, '--checkpoint'), (('evaluate', root), dict(checkpoint=tmp_path/'x.pth'), 'not found'),
                          (('predict', tmp_path/'none'), dict(checkpoint=tmp_path/'x.pth'), 'not found')]:
        with pytest.raises(SystemExit) as e: main(*map(str, args), **kw)
        err = capsys.readouterr().err
        assert e.value.code != 0 and err.startswith('error:') and msg in err and 'Traceback' not in err, (args, kw, err)


def _mmseg_file(model, path, classes):
    "An mmsegmentation checkpoint of `model` with the official SEG names (gamma_1/2, persistent relative_position_index)"
    import re
    from fastconvmae.backbone import relative_position_index
    sd = {re.sub(r'\.ls([12])\.gamma$', r'.gamma_\1', k): v for k, v in model.state_dict().items()}
    assert any(k.endswith('.gamma_1') for k in sd)
    for i in range(len(model.backbone.blocks3)):
        sd[f'backbone.blocks3.{i}.attn.relative_position_index'] = relative_position_index(*model.backbone.grid)
    torch.save({'meta': {'CLASSES': tuple(classes)}, 'state_dict': sd, 'optimizer': {}}, path)
    return path


def test_official_mmseg_checkpoint_evaluates_through_the_command(tmp_path):
    root = make_ade(tmp_path/'d')
    torch.manual_seed(0)
    m = create_segmentor(replace(SEG_PRESETS['cpu'], crop=64, channels=16, aux_channels=8), 3).eval()
    with torch.no_grad():
        for p in m.parameters(): p.normal_(0, 0.05)   # tables and layer scales non-trivial: a wrong mapping shows
    f = _mmseg_file(m, tmp_path/'iter_160000.pth', ['c0', 'c1', 'c2'])
    net, rec = load_segmenter(f)
    assert rec['num_classes'] == 3 and rec['classes'] == ['c0', 'c1', 'c2'] and rec['recipe']['crop'] == 64
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(): assert torch.equal(net.encode_decode(x), m.encode_decode(x))
    s_ref = evaluate_segmenter(m, root, scale=(64, 48), mode='whole')
    r = _cli('evaluate', root, '--checkpoint', f, '--mode', 'whole')
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s['n_images'] == 3 and 0 <= s['mIoU'] <= 1
    # on a dataset with other classes (ADE20K's model on CamVid, say): one line, before any image is predicted
    other = make_ade(tmp_path/'d5', n_train=1, n_val=1, k=5)
    r = _cli('evaluate', other, '--checkpoint', f, '--mode', 'whole')
    assert r.returncode == 2 and r.stderr.strip() == (f"error: the model predicts 3 classes but {other/'classes.txt'} names 5: "
                                                      "evaluate it on the dataset it was trained for"), r.stderr
    # a wrong index buffer is refused, not silently replaced
    sd = torch.load(f)['state_dict']; sd['backbone.blocks3.0.attn.relative_position_index'] = torch.zeros(16, 16, dtype=torch.long)
    torch.save({'state_dict': sd}, tmp_path/'bad.pth')
    r = _cli('evaluate', root, '--checkpoint', tmp_path/'bad.pth')
    assert r.returncode != 0 and r.stderr.startswith('error:') and 'relative-position index' in r.stderr, r.stderr
