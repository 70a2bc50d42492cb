"""Segmentation on images of different sizes and modes (issue 23): padded evaluation batches, whole / slide / flip inference,
scores at each image's own resolution, label maps of every mode, `segment predict` on a mixed folder, one-line worker errors,
and the command line trained and evaluated on a small mixed-size ADE20K-layout set made from the bundled photos."""
import json, math, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from fastconvmae.data import BadImageError, load_rgb
from fastconvmae.segmentation import *
from fastconvmae.segmentation import _infer
from fastconvmae.pretrain import worker_message as _worker_message

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT/'data').glob('*.jpg'))  # public-domain photos; camera.jpg is greyscale
BIN = Path(sys.executable).parent
CLASSES = ['dark', 'bright', 'grey', 'red', 'green', 'blue']
SIZES = [(96, 64), (64, 96), (80, 80), (112, 72), (72, 100), (88, 60), (100, 76), (60, 84), (104, 88), (76, 68)]


def colour_classes(rgb: np.ndarray) -> np.ndarray:
    "Label map (1-6, 0 = unlabelled on the top two rows) by a colour rule: dark, bright, grey, else the dominant channel"
    a = rgb.astype(np.int32); v, s = a.max(-1), a.max(-1) - a.min(-1)
    lbl = 4 + a.argmax(-1)
    lbl[s < 40] = 3; lbl[v < 60] = 1; lbl[(v > 200) & (s < 40)] = 2
    lbl[:2] = 0
    return lbl.astype(np.uint8)


def make_mixed_ade(root: Path, n_train: int=10, n_val: int=6) -> Path:
    """An ADE20K-layout folder of crops of the bundled photos, each of its own size: greyscale JPEGs, RGBA PNGs (part
    transparent) and a 16-bit greyscale PNG among the images, L, palette and 16-bit PNGs among the label maps"""
    rng = np.random.default_rng(0)
    for split, n, off in (('training', n_train, 0), ('validation', n_val, 3)):
        idir, adir = root/'images'/split, root/'annotations'/split
        idir.mkdir(parents=True, exist_ok=True); adir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = Image.open(PHOTOS[(i + off) % len(PHOTOS)])
            (W, H), (w, h) = im.size, SIZES[(i + off) % len(SIZES)]
            cw, ch = int(W * rng.uniform(0.5, 0.9)), int(H * rng.uniform(0.5, 0.9))
            x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
            im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
            kind = ('rgb', 'grey', 'rgba', 'grey16' if split == 'validation' else 'rgb')[i % 4]
            if kind == 'grey': im, f = im.convert('L'), idir/f'{i:03d}.jpg'
            elif kind == 'rgba':
                alpha = np.full((h, w), 255, np.uint8); alpha[:, :w // 4] = 128
                im = im.convert('RGBA'); im.putalpha(Image.fromarray(alpha)); f = idir/f'{i:03d}.png'
            elif kind == 'grey16': im, f = Image.fromarray(np.asarray(im.convert('L'), np.uint16) * 257), idir/f'{i:03d}.png'
            else: im, f = im.convert('RGB'), idir/f'{i:03d}.jpg'
            im.save(f)
            lbl = colour_classes(np.asarray(load_rgb(f)))  # the rule on the pixels as the loader sees them
            out = (Image.fromarray(lbl), Image.fromarray(lbl).convert('P'), Image.fromarray(lbl.astype(np.uint16)))[i % 3]
            out.save(adir/f'{i:03d}.png')
    (root/'classes.txt').write_text('\n'.join(CLASSES) + '\n')
    return root


@pytest.fixture(scope='module')
def mixed(tmp_path_factory) -> Path:
    return make_mixed_ade(tmp_path_factory.mktemp('mixed'))


from test_segmentation import Pyramid  # the stand-in multi-scale backbone (strides 4-32)


def toy_net(k=6):
    torch.manual_seed(0)
    return UperNet(Pyramid(), k, channels=16, aux_channels=8).eval()


def reference_pred(net, x, size, mode, crop, stride, flip) -> torch.Tensor:
    "One image alone, as mmsegmentation does it: logits resized to the original size; with flip, softmax of both averaged"
    logits = resize(_infer(net, x[None], mode, crop, stride), size)
    if not flip: return logits.argmax(1)
    flipped = resize(_infer(net, x[None].flip(-1), mode, crop, stride), size).flip(-1)
    return ((logits.softmax(1) + flipped.softmax(1)) / 2).log().argmax(1)


CFGS = [dict(mode='whole', crop=48, stride=32, flip=False), dict(mode='whole', crop=48, stride=32, flip=True),
        dict(mode='slide', crop=48, stride=32, flip=False), dict(mode='slide', crop=48, stride=32, flip=True)]


# ---------------------------------------------------------------- padding never counts
def test_mixed_set_is_mixed(mixed):
    ds = SegDataset(mixed, 'validation')
    sizes = {load_rgb(f).size for f in ds.files}
    modes = {Image.open(f).mode for f in ds.files} | {Image.open(f).mode for f in ds.labels}
    assert len(sizes) == len(ds) == 6 and {'L', 'RGBA', 'RGB', 'P', 'I;16'} <= modes, (sizes, modes)
    assert all(x.shape[-2:] == y.shape for x, y in (ds[i] for i in range(len(ds))))


@pytest.mark.parametrize('cfg', CFGS, ids=lambda c: f"{c['mode']}{'+flip' if c['flip'] else ''}")
def test_padded_batch_confusion_is_sum_of_per_image(mixed, cfg):
    net, ds = toy_net(), SegDataset(mixed, 'validation', SegEvalTransform((96, 64)))
    items = [ds[i] for i in range(len(ds))]
    x, sizes, y = pad_collate(items)
    cm = confusion_matrix(seg_predict(net, x, sizes, **cfg).argmax(1), y, 6)
    ref = sum(confusion_matrix(reference_pred(net, a, b.shape, **cfg), b[None], 6) for a, b in items)
    assert torch.equal(cm, ref)
    assert cm.sum() == sum(int(((b != 255) & (b < 6)).sum()) for _, b in items)  # every labelled pixel once, no padding


def test_same_size_images_are_batched_like_single_ones():
    net = toy_net()
    xs = [torch.randn(3, 40, 56), torch.randn(3, 40, 56), torch.randn(3, 24, 72)]
    x, sizes, _ = pad_collate([(a, torch.zeros(50, 70, dtype=torch.long)) for a in xs])
    out = seg_predict(net, x, sizes, mode='slide', crop=32, stride=24, flip=True)
    for k in range(3): torch.testing.assert_close(out[k:k + 1], seg_predict(net, xs[k][None], sizes[k:k + 1], 'slide', 32, 24, True),
                                                  atol=1e-4, rtol=1e-4)


def test_validation_loss_ignores_padding():
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 10, 12), torch.randn(1, 4, 7, 15)
    ya, yb = torch.randint(0, 4, (1, 10, 12)), torch.randint(0, 4, (1, 7, 15)); ya[0, 0] = 255
    P, Y = torch.full((2, 4, 10, 15), 9.), torch.full((2, 10, 15), PAD_LABEL)
    P[0, :, :10, :12], P[1, :, :7, :15], Y[0, :10, :12], Y[1, :7, :15] = a[0], b[0], ya[0], yb[0]
    la, lb = (F.cross_entropy(p, t, ignore_index=255, reduction='sum') for p, t in ((a, ya), (b, yb)))
    assert SegLoss()(P, Y).item() == pytest.approx(((la + lb) / (120 + 105)).item(), rel=1e-5)
    assert SegLoss(reduction='none')(P, Y).tolist() == pytest.approx([(la / 120).item(), (lb / 105).item()], rel=1e-5)


@pytest.mark.parametrize('cfg', CFGS[::3], ids=['whole', 'slide+flip'])
def test_evaluate_any_batch_size_same_scores(mixed, cfg):
    net = toy_net()
    kw = dict(scale=(96, 64), mode=cfg['mode'], crop=cfg['crop'], stride=cfg['stride'], flip=cfg['flip'])
    one, four = evaluate_segmenter(net, mixed, bs=1, **kw), evaluate_segmenter(net, mixed, bs=4, **kw)
    assert math.isfinite(one['mIoU']) and one['n_images'] == 6 and one['skipped'] == 0
    assert one['IoU'] == pytest.approx(four['IoU'], abs=1e-12, nan_ok=True)


def test_training_validation_with_mixed_sizes(mixed):
    learn = segment(mixed, 'cpu', output=None, num_workers=0, device='cpu', verbose=False, fit=False, crop=64, scale=(96, 64),
                    bs=2, iters=2, eval_interval=2, warmup_iters=1, channels=16, aux_channels=8, precision='fp32', valid_bs=4)
    x, sizes, y = learn.dls.valid.one_batch()
    assert x.shape[0] == 4 and sizes.shape == (4, 4) and (y == PAD_LABEL).any()
    with learn.no_bar(), learn.no_logging(): fit_segment(learn)
    s = learn.metrics[0].scores
    assert math.isfinite(s['mIoU']) and learn.metrics[0].total.sum() == sum(
        int(((b != 255) & (b < 6)).sum()) for _, b in (learn.dls.valid.dataset[i] for i in range(6)))
    ev = evaluate_segmenter(learn.model, mixed, scale=(96, 64), bs=1)  # the recipe's test_cfg, one image at a time
    assert ev['mIoU'] == pytest.approx(s['mIoU'], abs=1e-12)


# ---------------------------------------------------------------- files of every mode
def test_label_modes(tmp_path):
    lbl = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    Image.fromarray(lbl).convert('P').save(tmp_path/'p.png')
    Image.fromarray(lbl.astype(np.uint16) * 1).save(tmp_path/'i16.png')
    Image.fromarray(np.stack([lbl] * 3, -1)).save(tmp_path/'grey_rgb.png')
    Image.fromarray(np.stack([lbl, np.full_like(lbl, 255)], -1), 'LA').save(tmp_path/'la.png')
    for f in ('p.png', 'i16.png', 'grey_rgb.png', 'la.png'):
        assert load_label(tmp_path/f, reduce_zero_label=False).tolist() == lbl.tolist(), f
    Image.fromarray(np.stack([lbl * 50, lbl, lbl], -1)).save(tmp_path/'colour.png')
    with pytest.raises(BadImageError, match=r'colour\.png.*one channel'): load_label(tmp_path/'colour.png')


def test_unreadable_validation_pair_is_left_out_not_replaced(mixed, tmp_path):
    import shutil
    root = Path(shutil.copytree(mixed, tmp_path/'d'))
    Image.fromarray((np.zeros((5, 5, 3)) + [0, 9, 0]).astype(np.uint8)).save(root/'annotations'/'validation'/'002.png')  # colour label
    net = toy_net()
    with pytest.warns(UserWarning, match='002.png'): s = evaluate_segmenter(net, root, scale=(96, 64), bs=3)
    full = evaluate_segmenter(net, mixed, scale=(96, 64), bs=1)
    assert s['skipped'] == 1 and s['n_images'] == 6 and s['aAcc'] != full['aAcc']
    ds = SegDataset(root, 'validation', unreadable='mark')
    with pytest.warns(UserWarning): _, lbl = ds[2]
    assert (lbl == 255).all()


def test_class_values_beyond_the_names_are_ignored(mixed, tmp_path):
    import shutil
    root = Path(shutil.copytree(mixed, tmp_path/'d'))
    f = root/'annotations'/'validation'/'002.png'  # 16-bit
    a = np.array(Image.open(f), np.uint16); a[5:8] = 300
    Image.fromarray(a).save(f)
    with pytest.warns(UserWarning, match='class >= 6'): _, lbl = SegDataset(root, 'validation')[2]
    assert (lbl[5:8] == 255).all() and lbl[8:][lbl[8:] != 255].max() < 6


def test_transform_error_names_the_file(mixed):
    def bad(img, lbl): raise ValueError('boom')
    with pytest.raises(SegDataError, match=r'000\.jpg.*boom'): SegDataset(mixed, 'validation', bad)[0]


def test_worker_message():
    class Broken(torch.utils.data.Dataset):
        def __len__(self): return 1
        def __getitem__(self, i): raise SegDataError('cannot transform a/b.jpg (3x4): ValueError: boom') from KeyError('x')
    with pytest.raises(SegDataError) as e: next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert 'Traceback' in str(e.value)
    assert _worker_message(str(e.value)) == 'cannot transform a/b.jpg (3x4): ValueError: boom'
    assert _worker_message('cannot read x') is None


# ---------------------------------------------------------------- the command line
def _cli(*args, timeout=600):
    return subprocess.run([str(BIN/'fastconvmae_segment'), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})

TINY = ['--crop', 64, '--scale', '96,64', '--bs', 2, '--iters', 4, '--eval_interval', 2, '--warmup_iters', 1,
        '--channels', 16, '--aux_channels', 8, '--precision', 'fp32']


def _last_json(r) -> dict: return json.loads(r.stdout.strip().splitlines()[-1])


def test_cli_mixed_sizes_train_evaluate_predict(mixed, tmp_path):
    from fastconvmae.models import create_model
    pre = create_model('fastconvmae_convvit_tiny_patch16', img_size=64)  # a pretraining checkpoint of this package's layout
    torch.save(dict(model=pre.state_dict(), epoch=0, optimizer={}), tmp_path/'pretrained.pth')
    out = tmp_path/'run'
    r = _cli('train', mixed, '--preset', 'cpu', '--checkpoint', tmp_path/'pretrained.pth', '--output', out, *TINY,
             '--valid_bs', 4, '--workers', 1)
    assert r.returncode == 0, r.stderr
    s = _last_json(r)
    assert math.isfinite(s['mIoU']) and 0 <= s['mIoU'] <= 1 and (out/'segmenter.pth').exists()
    seg = out/'segmenter.pth'
    r = _cli('evaluate', mixed, '--checkpoint', seg, '--valid_bs', 3, '--workers', 1)  # the recipe's whole-image inference
    assert r.returncode == 0, r.stderr
    e = _last_json(r)
    assert e['mIoU'] == pytest.approx(s['mIoU'], abs=1e-12) and e['n_images'] == 6 and e['bs'] == 3 and e['skipped'] == 0
    r = _cli('evaluate', mixed, '--checkpoint', seg, '--mode', 'slide', '--window', 48, '--stride', 32, '--flip')
    assert r.returncode == 0, r.stderr
    e = _last_json(r)
    assert math.isfinite(e['mIoU']) and e['test_cfg'] == dict(mode='slide', crop=48, stride=32, flip=True) and e['bs'] == 1
    model, ck = load_segmenter(seg)
    e4 = evaluate_segmenter(model, mixed, scale=ck['recipe']['scale'], mode='slide', crop=48, stride=32, flip=True, bs=4)
    assert e4['mIoU'] == pytest.approx(e['mIoU'], abs=1e-9)
    # predict on a folder of mixed sizes and modes, one file unreadable: reported, skipped, the others drawn
    imgs = tmp_path/'imgs'; imgs.mkdir()
    for f in (mixed/'images'/'validation').iterdir(): (imgs/f.name).write_bytes(f.read_bytes())
    (imgs/'broken.jpg').write_bytes(b'not a jpeg')
    r = _cli('predict', imgs, '--checkpoint', seg, '--output', tmp_path/'pred', '--mode', 'slide', '--window', 48, '--stride', 32, '--flip')
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path/'pred').glob('*.png')) == [f'{i:03d}.png' for i in range(6)]
    assert 'broken.jpg' in r.stderr and '1 unreadable' in r.stdout
    (img, pred), = predict_masks(model, [imgs/'003.png'])  # the 16-bit greyscale photo: prediction at its own size
    w, h = SIZES[(3 + 3) % len(SIZES)]
    assert Image.open(imgs/'003.png').mode == 'I;16' and img.shape == (h, w, 3) and pred.shape == (h, w)


def test_cli_worker_error_is_one_line(mixed, tmp_path):
    import shutil
    root = Path(shutil.copytree(mixed, tmp_path/'d'))
    for f in (root/'annotations'/'training').iterdir():  # every training label map in colour: nothing to train on
        a = np.asarray(Image.open(f).convert('L'))
        Image.fromarray(np.stack([a, a * 2, a], -1).astype(np.uint8)).save(f)
    r = _cli('train', root, '--output', tmp_path/'run', *TINY, '--workers', 1)
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert r.returncode == 1 and len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr
    assert 'Traceback' not in r.stderr and 'DataLoader worker' not in r.stderr, r.stderr
    assert str(root/'annotations'/'training') in errors[0] and 'one channel' in errors[0], errors[0]
    r = _cli('train', root, '--output', tmp_path/'run2', *TINY, '--workers', 1, '--debug')
    assert r.returncode != 0 and 'Traceback' in r.stderr
