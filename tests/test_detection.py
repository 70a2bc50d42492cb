"Mask R-CNN on ConvViT: COCO data with LSJ, the model, COCO evaluation, training with resume, and the command line."
import json, math, os, subprocess, sys, warnings
from pathlib import Path
import pytest, torch
from torchvision.ops import masks_to_boxes
from fastconvmae.detection import (CocoInstances, find_split, LargeScaleJitter, ResizePad, synthetic_coco, maskrcnn_convvit,
                                   gt_as_predictions, detection_param_groups, DetectionRecipe, coco_dls, detection_learner,
                                   evaluate_detection, COCOEvaluator)
from fastconvmae.data import BadImageWarning
from fastconvmae.detection import fit_detection
from fastai.callback.progress import ProgressCallback

SHARED = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    return synthetic_coco(tmp_path_factory.mktemp('coco') / 'syn', n_images=8, n_cats=2, seed=1)

@pytest.fixture(scope='module')
def syn4(tmp_path_factory):  # one batch: the training loops only need to run
    return synthetic_coco(tmp_path_factory.mktemp('coco4') / 'syn', n_images=4, n_cats=2, seed=1)

def test_lsj_keeps_image_boxes_masks_consistent(syn):
    ds = CocoInstances(*find_split(syn, 'train'), tfm=LargeScaleJitter(96), train=True)
    torch.manual_seed(0)
    scales, kept = [], 0
    for k in range(60):
        img, t = ds[k % len(ds)]
        assert img.shape == (3, 96, 96) and t['masks'].shape[-2:] == (96, 96)
        assert len(t['boxes']) == len(t['labels']) == len(t['masks'])
        if len(t['boxes']):
            kept += 1
            torch.testing.assert_close(masks_to_boxes(t['masks'].bool()).float() + torch.tensor([0, 0, 1., 1]), t['boxes'].as_subclass(torch.Tensor))
            assert (t['masks'].flatten(1).sum(1) > 0).all()
        scales.append(float(t['scale']))
    assert kept > 30 and min(scales) < 0.5 * 96 / 128 and max(scales) > 1.5 * 96 / 128  # scales spread over 0.1-2.0 of the fit

def test_flip_moves_masks_with_image(syn):
    img, t = CocoInstances(*find_split(syn, 'train'))[0]
    xf, tf = LargeScaleJitter(128, scale=(1., 1.), flip=1.)(img, dict(t))
    xn, tn = LargeScaleJitter(128, scale=(1., 1.), flip=0.)(img, dict(t))
    assert torch.equal(xf, xn.flip(-1))
    assert torch.equal(tf['masks'].as_subclass(torch.Tensor), tn['masks'].as_subclass(torch.Tensor).flip(-1))

def test_missing_empty_and_unreadable_images(tmp_path):
    root = synthetic_coco(tmp_path / 'c', n_images=6, empty=2, missing=1)
    with pytest.warns(BadImageWarning, match='1 of 7 images'):
        tr = CocoInstances(*find_split(root, 'train'), train=True)
    with pytest.warns(BadImageWarning):
        va = CocoInstances(*find_split(root, 'val'))
    assert len(tr) == 4 and len(va) == 6 and tr.n_empty == 2
    img, t = va[0]                                   # an image without instances: empty targets, no crash
    assert t['boxes'].shape == (0, 4) and t['masks'].shape[0] == 0
    (root / 'train' / 'img3.png').write_bytes(b'not a png')
    with pytest.warns(BadImageWarning, match='unreadable'):
        img, t = tr[tr.ids.index(4)]
    assert tr.n_skipped == 1 and int(t['image_id']) == 5
    with pytest.raises(FileNotFoundError, match='instances_test.json'): find_split(root, 'test')
    (root / 'annotations' / 'instances_bad.json').write_text('{"images": 3}'); (root / 'bad').mkdir()
    with pytest.raises(ValueError, match='not a COCO instances file'): CocoInstances(root / 'bad', root / 'annotations' / 'instances_bad.json')

def test_ground_truth_as_predictions_scores_ap_100(syn):
    ev = gt_as_predictions(CocoInstances(*find_split(syn, 'val'), tfm=ResizePad(128)))
    for iou in ('bbox', 'segm'): assert ev.stats()[iou]['AP'] == pytest.approx(100.)
    empty = COCOEvaluator(ev.coco_gt, ev.cat_ids)
    empty.add([dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), scores=torch.zeros(0),
                    masks=torch.zeros(0, 1, 128, 128))], [CocoInstances(*find_split(syn, 'val'), tfm=ResizePad(128))[0][1]])
    assert empty.stats()['bbox']['AP'] == 0.

@pytest.mark.skipif(not (SHARED / 'balloon').exists(), reason='shared/data/balloon not found beside the repository')
def test_ground_truth_as_predictions_balloon_1024():
    ev = gt_as_predictions(CocoInstances(*find_split(SHARED / 'balloon', 'val'), tfm=ResizePad(1024)))
    assert ev.stats()['bbox']['AP'] == pytest.approx(100.) and ev.stats()['segm']['AP'] == pytest.approx(100.)

def test_model_shapes_and_param_groups():
    m = maskrcnn_convvit(3, 'tiny', img_size=64, window_size=2)
    assert m.roi_heads.box_predictor.cls_score.out_features == 4          # 3 classes + background
    assert len(m.rpn.head.conv) == 2                                         # two RPN convs
    assert m.backbone.out_channels == 256 and m.backbone.body.global_blocks == (0, 3, 5)
    g = detection_param_groups(m)
    nd = {id(p) for p in g[1]['params']}
    assert g[0]['weight_decay'] == 0.1 and g[1]['weight_decay'] == 0.
    assert id(m.backbone.body.windowed_rel_pos_bias.relative_position_bias_table) in nd
    assert id(m.roi_heads.box_head[0][1].weight) in nd and id(m.roi_heads.box_head[0][0].weight) not in nd
    m.eval()
    with torch.no_grad(): out = m([torch.rand(3, 64, 64)] * 2)
    assert len(out) == 2 and out[0]['masks'].shape[-2:] == (64, 64)

def _learner(root, out, epochs=2, precision='auto', bs=4, **schedule):
    "A tiny detector's learner on `root`: `epochs` with a half-epoch warm-up, or the iteration `schedule` (max_iter, warmup_iters)"
    schedule = schedule or dict(epochs=epochs, warmup_epochs=0.5)
    r = DetectionRecipe(arch='tiny', img_size=64, window_size=2, bs=bs, lr=2e-4, precision=precision, **schedule,
                        rpn_post_nms_top_n_train=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=16, box_detections_per_img=10)
    torch.manual_seed(0)
    learn = detection_learner(coco_dls(root, 64, bs, seed=0), r, output=out, verbose=False)
    learn.remove_cb(ProgressCallback)
    return learn

def test_train_checkpoint_and_exact_resume(syn4, tmp_path):
    syn = syn4
    a = _learner(syn, tmp_path / 'a'); fit_detection(a)
    b1 = _learner(syn, tmp_path / 'b', epochs=2)
    # stop after the first epoch by training a 2-epoch schedule for one epoch, then resume the rest
    from fastai.callback.core import Callback, CancelFitException
    class StopAfter(Callback):
        order = 100
        def after_epoch(self):
            if self.epoch == 0: raise CancelFitException()
    b1.add_cb(StopAfter()); fit_detection(b1); b1.remove_cb(StopAfter)
    ck = torch.load(tmp_path / 'b' / 'checkpoint-latest.pth', weights_only=True)
    assert ck['epoch'] == 0 and ck['categories'][0]['name'] == 'box'
    c = _learner(syn, tmp_path / 'b', epochs=2)
    fit_detection(c, resume=tmp_path / 'b' / 'checkpoint-latest.pth')
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert max((sa[k].float() - sc[k].float()).abs().max().item() for k in sa) < 1e-6
    assert abs(a.recorder.values[-1][0] - c.recorder.values[-1][0]) < 1e-5     # same training loss in the resumed epoch
    st = evaluate_detection(tmp_path / 'a' / 'checkpoint-latest.pth', syn)
    assert st['bbox']['AP'] == pytest.approx(a.recorder.values[-1][1], abs=1e-3)

def _cli(*args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '2', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run([sys.executable, '-m', 'fastconvmae.detection', *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)

def test_cli_train_evaluate_predict(syn4, tmp_path):
    syn = syn4
    r = _cli('train', '--data', syn, '--arch', 'tiny', '--img_size', 64, '--window_size', 2, '--epochs', 1, '--bs', 4,
             '--output', tmp_path / 'run', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'box' in r.stdout and (tmp_path / 'run' / 'checkpoint-latest.pth').exists()
    res = json.loads((tmp_path / 'run' / 'results_val.json').read_text())
    assert isinstance(res, list) and all({'image_id', 'category_id', 'bbox', 'score'} <= set(o) for o in res)
    ck = tmp_path / 'run' / 'checkpoint-latest.pth'
    r = _cli('evaluate', '--checkpoint', ck, '--data', syn, '--output', tmp_path / 'ev', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'AP50' in r.stdout and (tmp_path / 'ev' / 'results_val.json').exists()
    r = _cli('predict', '--checkpoint', ck, '--images', syn / 'train' / 'img0.png', '--output', tmp_path / 'pred', '--score_thresh', 0.0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'pred' / 'img0_pred.png').stat().st_size > 1000
    r = _cli('train', '--data', syn, '--arch', 'tiny', '--img_size', 64, '--window_size', 2, '--epochs', 1,
             '--output', tmp_path / 'run', cwd=tmp_path)                      # refuses to overwrite a run
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr
    r = _cli('train', '--data', syn, '--arch', 'tiny', '--img_size', 64, '--window_size', 2, '--epochs', 1,
             '--output', tmp_path / 'run', '--overwrite', '--n_train', 2, cwd=tmp_path)  # unless asked to
    assert r.returncode == 0, r.stderr[-2000:]

@pytest.mark.parametrize('args,msg', [
    (['train', '--data', 'nowhere'], 'dataset folder not found'),
    (['train', '--data', '{syn}', '--img_size', 64, '--window_size', 3], 'window_size'),
    (['predict', '--checkpoint', 'missing.pth', '--images', '{syn}'], 'not found'),
])
def test_cli_user_errors(syn, tmp_path, args, msg):
    r = _cli(*[str(a).format(syn=syn) for a in args], cwd=tmp_path)
    assert r.returncode in (1, 2) and r.stderr.startswith('error:') and msg in r.stderr and 'Traceback' not in r.stderr, r.stderr

@pytest.mark.parametrize('kw,msg', [
    (dict(mode='train', data='{syn}', img_size=100), 'multiple of 16'),
    (dict(mode='train', data='{syn}', epochs=0), '--epochs must be'),
    (dict(mode='train', data='{syn}', preset='huge'), 'unknown preset'),
    (dict(mode='evaluate', data='{syn}'), 'needs DATA and --checkpoint'),
    (dict(mode='dance'), 'unknown mode'),
])
def test_user_errors_in_process(syn, tmp_path, kw, msg):
    from fastconvmae.detection import _main
    from fastconvmae.pretrain import UserError
    kw = {k: str(v).format(syn=syn) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(UserError, match=msg): _main(output=str(tmp_path / 'o'), **kw)

def test_cli_ddp_two_processes_gloo(syn4, tmp_path):
    "The same command line under torchrun (2 CPU processes, gloo): sharded batches, gathered COCO evaluation, one checkpoint."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                        '-m', 'fastconvmae.detection', 'train', '--data', str(syn4), '--arch', 'tiny', '--img_size', '64',
                        '--window_size', '2', '--epochs', '1', '--bs', '2', '--output', str(tmp_path / 'run')],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'batch 2 x 1 x 2' in r.stdout and 'box_AP' in r.stdout
    ck = torch.load(tmp_path / 'run' / 'checkpoint-latest.pth', weights_only=True)
    assert len(ck['rng_per_rank']) == 2 and ck['epoch'] == 0
    assert 'module.' not in next(iter(ck['model']))

def test_image_whose_size_differs_from_its_annotations_is_skipped(tmp_path):
    "A wrong JSON, or a photo that EXIF orientation turns, would stretch every mask: the image is skipped, named, with its sizes."
    from PIL import Image
    root = synthetic_coco(tmp_path / 'c', n_images=4, n_cats=2, seed=1)
    ds = CocoInstances(*find_split(root, 'train'))
    f = ds.images / ds.coco.imgs[ds.ids[0]]['file_name']
    im = Image.open(f); im.transpose(Image.Transpose.TRANSPOSE).crop((0, 0, im.width // 2, im.height)).save(f)
    with pytest.warns(BadImageWarning, match=rf"{f.name} is {im.width // 2} x {im.height} but its annotations give {im.width} x {im.height}"):
        img, t = ds[0]
    assert int(t['image_id']) == ds.ids[1] and ds.n_skipped == 1

# ---------------------------------------------------------------------------------------------------------------------
# Issue 22: the official detector by default (padding, evaluation, schedule), detectron2 checkpoints, a detector that learns

def _d2_paste(masks, boxes, h, w):
    "detectron2 v0.6 `_do_paste_mask(skip_empty=False)` (layers/mask_ops.py), transcribed: grid_sample at pixel centres"
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = (torch.arange(0, h, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    img_x = (torch.arange(0, w, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    N = len(masks)
    gx, gy = img_x[:, None, :].expand(N, h, w), img_y[:, :, None].expand(N, h, w)
    return torch.nn.functional.grid_sample(masks[:, None], torch.stack([gx, gy], dim=3), align_corners=False)[:, 0]

def test_paste_masks_is_detectron2s():
    from fastconvmae.detection import paste_masks
    g = torch.Generator().manual_seed(0)
    h, w, n = 61, 83, 12
    masks = torch.rand(n, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 5           # some boxes cross the image border
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 2], 1)
    ref = _d2_paste(masks, boxes, h, w)
    torch.testing.assert_close(paste_masks(masks, boxes, (h, w), threshold=None), ref, atol=1e-6, rtol=0)
    assert torch.equal(paste_masks(masks, boxes, (h, w)), ref >= 0.5)       # threshold >= 0.5, as detectron2

def test_postprocess_at_original_size():
    "Boxes times max(h, w) / canvas, clipped; a detection whose clipped box is empty is dropped (detectron2's `nonempty`); masks pasted at h x w."
    from fastconvmae.detection import detector_postprocess
    pred = dict(boxes=torch.tensor([[10., 20., 50., 60.], [10., 90., 50., 120.], [90., 5., 140., 40.]]), scores=torch.tensor([.9, .8, .7]),
                labels=torch.tensor([1, 2, 1]), mask_probs=torch.rand(3, 1, 28, 28))
    out = detector_postprocess(pred, (60, 100), canvas=128)                  # a 100 x 60 photo shown as 128 x 77 on a 128 canvas
    k = 100 / 128
    assert len(out['boxes']) == 2 and out['labels'].tolist() == [1, 1]       # the box wholly in the padding (y > 60 * 1.28) is gone
    torch.testing.assert_close(out['boxes'][0], torch.tensor([10., 20., 50., 60.]) * k)
    torch.testing.assert_close(out['boxes'][1], torch.tensor([90 * k, 5 * k, 100., 40 * k]))  # clipped to the photo
    assert out['masks'].shape == (2, 60, 100) and out['masks'].dtype == torch.bool
    assert torch.equal(out['masks'], _d2_paste(pred['mask_probs'][[0, 2], 0], out['boxes'], 60, 100) >= 0.5)

def test_padding_is_grey_128(syn):
    from fastconvmae.detection import PAD_VALUE, MEAN_FILL
    assert PAD_VALUE == 128
    ds = CocoInstances(*find_split(syn, 'val'), tfm=ResizePad(256))          # 128 x 96 photos: the bottom quarter is padding
    img, t = ds[0]
    assert img.shape == (3, 256, 256) and torch.all(img[:, 192:] == 128 / 255)
    torch.manual_seed(0)
    img, t = CocoInstances(*find_split(syn, 'train'), tfm=LargeScaleJitter(256, scale=(0.3, 0.3), flip=0.), train=True)[0]
    assert torch.all(img[:, 100:] == 128 / 255) and torch.all(img[:, :, 100:] == 128 / 255)
    img, _ = CocoInstances(*find_split(syn, 'val'), tfm=ResizePad(256, pad_value=MEAN_FILL))[0]   # the documented alternative
    assert torch.allclose(img[:, 200, 0], torch.tensor(MEAN_FILL) / 255)

def _fvcore_multiplier(where, warmup, factor=0.001):
    "fvcore CompositeParamScheduler([Linear(factor * cos(0), cos(warmup)), Cosine(1, 0)], ['rescaled', 'fixed']), written out"
    import math
    cos = lambda t: 0. + 0.5 * (1. - 0.) * (1 + math.cos(math.pi * t))
    if where + 1e-6 > warmup: return cos(where)
    r = where / warmup
    return cos(warmup) * r + factor * cos(0) * (1 - r)

def test_coco_presets_count_official_iterations():
    from fastconvmae.detection import DETECTION_PRESETS, warmup_cosine, detection_recipe
    for name, it in (('coco_25ep', 92187), ('coco_50ep', 184375), ('coco_100ep', 368750)):
        r = DETECTION_PRESETS[name]
        assert r.max_iter == it and r.bs * r.devices == 32 and r.warmup_factor == 0.001
        assert 460 < r.warmup_iters < 461
        f = warmup_cosine(1., r.warmup_iters / r.max_iter, r.warmup_factor)
        for i in (0, 1, 200, 459, 460, 461, 462, it // 2, it - 1):
            assert f(i / it) == pytest.approx(_fvcore_multiplier(i / it, r.warmup_iters / r.max_iter), rel=1e-12, abs=1e-15), (name, i)
        assert f(0.) == pytest.approx(0.001) and f(460 / it) < f(461 / it) and f((it - 1) / it) < 1e-8
    r = detection_recipe('coco_25ep', epochs=3)                             # an epoch count given: the run is counted in epochs
    assert r.max_iter is None and r.epochs == 3
    assert detection_recipe('cpu', max_iter=10).max_iter == 10

def _iter_learner(root, out, max_iter=3, precision='auto'):
    return _learner(root, out, precision=precision, bs=2, max_iter=max_iter, warmup_iters=1.5)

def test_max_iter_schedule_stop_and_exact_resume(syn4, tmp_path):
    "3 steps of 2 batches per epoch: 2 epochs, the second stopped after one step; the lrs are detectron2's; resuming after epoch 0 is exact."
    from fastai.callback.core import Callback, CancelFitException
    from fastconvmae.detection import warmup_cosine
    a = _iter_learner(syn4, tmp_path / 'a'); fit_detection(a)
    assert len(a.recorder.lrs) == 3 and len(a.recorder.values) == 2
    assert len(a.recorder.values[-1]) == len(a.recorder.values[0])          # the stopped epoch still logs its training loss
    f = warmup_cosine(2e-4, 1.5 / 3)
    assert a.recorder.lrs == pytest.approx([f(0.), f(1 / 3), f(2 / 3)])
    b = _iter_learner(syn4, tmp_path / 'b')
    class StopAfter(Callback):
        order = 100
        def after_epoch(self):
            if self.epoch == 0: raise CancelFitException()
    b.add_cb(StopAfter()); fit_detection(b); b.remove_cb(StopAfter)
    c = _iter_learner(syn4, tmp_path / 'b')
    fit_detection(c, resume=tmp_path / 'b' / 'checkpoint-latest.pth')
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert max((sa[k].float() - sc[k].float()).abs().max().item() for k in sa) < 1e-6
    assert c.recorder.lrs == pytest.approx(a.recorder.lrs)

def test_validation_and_evaluation_run_in_fp32(syn4, tmp_path):
    "bf16 training, fp32 validation (no autocast, as the official evaluation), whose AP `evaluate_detection` of the checkpoint repeats."
    learn = _iter_learner(syn4, tmp_path / 'a', max_iter=2, precision='bf16')
    seen = set()
    learn.model.backbone.body.register_forward_hook(lambda mod, i, o: seen.add((mod.training, torch.is_autocast_enabled('cpu'))))
    fit_detection(learn)
    assert seen == {(True, True), (False, False)}                           # autocast in training only
    st = evaluate_detection(tmp_path / 'a' / 'checkpoint-latest.pth', syn4)
    assert st['bbox']['AP'] == pytest.approx(learn.recorder.values[-1][1], abs=1e-6)
    assert st['segm']['AP'] == pytest.approx(learn.recorder.values[-1][3], abs=1e-6)

# --- detectron2 checkpoints ---------------------------------------------------------------------------------------------

def _to_detectron2(sd: dict, K: int) -> dict:
    "This package's Mask R-CNN state dict in detectron2's layout, the inverse of the research notes' table, written by hand"
    out = {}
    for k, v in sd.items():
        p = k.split('.')
        if k.startswith('backbone.body.'): k2 = 'backbone.bottom_up.' + k[len('backbone.body.'):]
        elif k.startswith('backbone.fpn.'):
            kind = {'inner_blocks': 'fpn_lateral', 'layer_blocks': 'fpn_output'}[p[2]]
            k2 = f"backbone.{kind}{int(p[3]) + 2}." + ('weight' if p[4] == '0' else 'norm.' + p[5])
        elif k.startswith('rpn.head.conv.'): k2 = f'proposal_generator.rpn_head.conv.conv{p[3]}.{p[5]}'
        elif k.startswith('rpn.head.cls_logits.'): k2 = 'proposal_generator.rpn_head.objectness_logits.' + p[-1]
        elif k.startswith('rpn.head.bbox_pred.'): k2 = 'proposal_generator.rpn_head.anchor_deltas.' + p[-1]
        elif k.startswith('roi_heads.box_head.'):
            i = int(p[2])
            k2 = f'roi_heads.box_head.fc1.{p[3]}' if i == 5 else f'roi_heads.box_head.conv{i + 1}.' + ('weight' if p[3] == '0' else 'norm.' + p[4])
        elif k.startswith('roi_heads.box_predictor.cls_score.'): k2, v = k, torch.cat([v[1:], v[:1]])     # background last
        elif k.startswith('roi_heads.box_predictor.bbox_pred.'): k2, v = k, v[4:]                        # no background rows
        elif k.startswith('roi_heads.mask_head.'):
            k2 = f'roi_heads.mask_head.mask_fcn{int(p[2]) + 1}.' + ('weight' if p[3] == '0' else 'norm.' + p[4])
        elif k.startswith('roi_heads.mask_predictor.conv5_mask.'): k2 = 'roi_heads.mask_head.deconv.' + p[-1]
        elif k.startswith('roi_heads.mask_predictor.mask_fcn_logits.'): k2, v = 'roi_heads.mask_head.predictor.' + p[-1], v[1:]
        else: raise KeyError(k)
        out[k2] = v.clone()
    n = lambda s: (2 * s - 1) ** 2
    for t in ('windowed', 'global'):  # the persistent index buffers a detectron2 file holds (any value: they are recomputed)
        s = math.isqrt(out[f'backbone.bottom_up.{t}_rel_pos_bias.relative_position_bias_table'].shape[0]) // 2 + 1
        out[f'backbone.bottom_up.{t}_rel_pos_bias.relative_position_index'] = torch.zeros(s * s, s * s, dtype=torch.int64)
    return out

def _random_stats(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m

def test_detectron2_keys_and_class_order():
    from fastconvmae.detection import detectron2_to_torchvision, detectron2_model, is_detectron2
    from fastconvmae.checkpoint import CheckpointMismatchError
    torch.manual_seed(0)
    m = _random_stats(maskrcnn_convvit(2, 'tiny', img_size=64, window_size=2, verbose=False)).eval()
    d2 = _to_detectron2(m.state_dict(), 2)
    assert is_detectron2({'model': d2}) and not is_detectron2({'model': m.state_dict()})
    tv = detectron2_to_torchvision({'model': d2})
    rows = {'roi_heads.box_predictor.bbox_pred.': 4, 'roi_heads.mask_predictor.mask_fcn_logits.': 1}   # background rows: zeros
    assert set(tv) == set(m.state_dict())
    for k, v in m.state_dict().items():
        n = next((r for p, r in rows.items() if k.startswith(p)), 0)
        assert (torch.equal(tv[k][n:], v[n:]) and not tv[k][:n].any()) if n else torch.equal(tv[k], v), k
    # class i of detectron2 is label i + 1: make d2 class 1 win everywhere, the model then labels everything 2
    d2['roi_heads.box_predictor.cls_score.weight'].zero_(); d2['roi_heads.box_predictor.cls_score.bias'].copy_(torch.tensor([0., 9., 0.]))
    m2 = detectron2_model(detectron2_to_torchvision({'model': d2})).eval()
    with torch.no_grad(): p = m2([torch.rand(3, 64, 64)])[0]
    assert len(p['labels']) and set(p['labels'].tolist()) == {2}
    with pytest.raises(CheckpointMismatchError, match='1 detectron2 keys .*: roi_heads.keypoint_head.conv_fcn1.weight'):  # nothing dropped silently
        detectron2_to_torchvision({'model': {**d2, 'roi_heads.keypoint_head.conv_fcn1.weight': torch.zeros(3)}})
    # older detectron2 files hold the normalisation: ImageNet's RGB mean and std in 0-255 are what the model applies, so dropped
    rgb = dict(pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1), pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1))
    with_px, without = detectron2_to_torchvision({'model': {**d2, **rgb}}), detectron2_to_torchvision({'model': d2})
    assert with_px.keys() == without.keys() and all(torch.equal(with_px[k], without[k]) for k in without)
    with pytest.raises(CheckpointMismatchError, match=r"pixel_mean is \[103.53, 116.28, 123.675\], not ImageNet's"):  # BGR: refused
        detectron2_to_torchvision({'model': {**d2, **rgb, 'pixel_mean': rgb['pixel_mean'].flip(0)}})
    with pytest.raises(CheckpointMismatchError, match=r'1 unexpected \(roi_heads.box_head.7.weight'):  # a second fc: no such layer here
        detectron2_model(detectron2_to_torchvision({'model': {**d2, 'roi_heads.box_head.fc2.weight': torch.zeros(3)}}))
    with pytest.raises(CheckpointMismatchError, match='missing'):
        detectron2_model(detectron2_to_torchvision({'model': {k: v for k, v in d2.items() if 'mask_fcn1.weight' not in k}}))

def test_cli_evaluates_a_detectron2_checkpoint(syn4, tmp_path):
    "A detectron2-layout file through `detect evaluate --checkpoint`: the same COCO results as the package model it was made from."
    from dataclasses import asdict
    from fastconvmae.detection import DETECTION_PRESETS
    torch.manual_seed(0)
    m = _random_stats(maskrcnn_convvit(2, 'tiny', img_size=64, window_size=2, drop_path_rate=0., verbose=False)).eval()
    torch.save({'model': _to_detectron2(m.state_dict(), 2), 'iteration': 99}, tmp_path / 'model_final.pth')
    r = DetectionRecipe(**{**asdict(DETECTION_PRESETS['coco_25ep']), 'arch': 'tiny', 'img_size': 64, 'window_size': 2, 'drop_path_rate': 0.})
    cats = [dict(id=c, name=n) for c, n in ((1, 'box'), (2, 'blob'))]
    torch.save(dict(model=m.state_dict(), recipe=asdict(r), categories=cats), tmp_path / 'package.pth')
    ref = evaluate_detection(tmp_path / 'package.pth', syn4, output=tmp_path / 'ref')
    res = _cli('evaluate', syn4, '--checkpoint', tmp_path / 'model_final.pth', '--output', tmp_path / 'd2', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    a = json.loads((tmp_path / 'ref' / 'results_val.json').read_text())
    b = json.loads((tmp_path / 'd2' / 'results_val.json').read_text())
    assert len(a) == len(b) > 10 and all('segmentation' in o for o in b)
    for x, y in zip(a, b):
        assert (x['image_id'], x['category_id'], x['segmentation']) == (y['image_id'], y['category_id'], y['segmentation'])
        assert x['bbox'] == pytest.approx(y['bbox'], abs=1e-4) and x['score'] == pytest.approx(y['score'], abs=1e-6)
    st = json.loads((tmp_path / 'd2' / 'metrics_val.json').read_text())['stats']
    for iou in ('bbox', 'segm'): assert st[iou] == pytest.approx(ref[iou], nan_ok=True)

FIXTURE_DET = REPO / 'tests' / 'fixtures' / 'official_det_tiny.pt'

@pytest.mark.skipif(not FIXTURE_DET.exists(), reason='tests/fixtures/official_det_tiny.pt not built (tools/official_downstream_fixtures.py)')
def test_official_detectron2_checkpoint_reproduces_official_backbone_maps():
    "The official tiny ConvViTDet's detectron2 file, through the converter and `detectron2_model`: the four maps within 1e-5 (relative)."
    import importlib.util
    from fastconvmae.detection import detectron2_to_torchvision, detectron2_model
    from fastconvmae.models import rel_err
    spec = importlib.util.spec_from_file_location('odf', REPO / 'tools' / 'official_downstream_fixtures.py')
    odf = importlib.util.module_from_spec(spec); spec.loader.exec_module(odf)
    fx = torch.load(FIXTURE_DET, weights_only=True)
    m = detectron2_model(detectron2_to_torchvision(odf.materialise(fx['checkpoint']))).eval()
    assert (m.img_size, m.num_classes, m.backbone.body.window_size, m.backbone.body.global_blocks) == (256, 2, 8, (0, 3, 6, 10))
    with torch.no_grad(): out = m.backbone.body(fx['image'])
    for k in fx['feature_names']: assert rel_err(out[k], fx['features'][k]) <= 1e-5, k

# --- the detector learns ------------------------------------------------------------------------------------------------

#: 8 balloon training photos with large balloons (every balloon's shorter side >= 28 % of the photo's longer side): seven with
#: one balloon, one (16) with two. Chosen by hand: a pink balloon on a pink dress (15) and a half-hidden one (42) were left out,
#: because from random weights they take a few hundred more steps, and which of them a run learns first depends on the seed
BALLOON_8 = (43, 59, 13, 33, 6, 39, 7, 16)

def _balloon_8(root: Path, repeat: int) -> Path:
    "A COCO folder of 8 balloon photos (symlinks): `val` holds them once, `train` lists them `repeat` times (one epoch = many steps)"
    src = SHARED / 'balloon'
    d = json.loads((src / 'annotations' / 'instances_train.json').read_text())
    imgs = [i for i in d['images'] if i['id'] in BALLOON_8]
    anns = [a for a in d['annotations'] if a['image_id'] in BALLOON_8]
    (root / 'annotations').mkdir(parents=True); (root / 'train').mkdir()
    for i in imgs: (root / 'train' / i['file_name']).symlink_to(src / 'train' / i['file_name'])
    (root / 'val').symlink_to('train')
    (root / 'annotations' / 'instances_val.json').write_text(json.dumps(dict(images=imgs, annotations=anns, categories=d['categories'])))
    rep = lambda r: ([{**i, 'id': i['id'] + 1000 * r} for i in imgs],
                     [{**a, 'id': a['id'] + 100_000 * r, 'image_id': a['image_id'] + 1000 * r} for a in anns])
    reps = [rep(r) for r in range(repeat)]
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(dict(
        images=[i for im, _ in reps for i in im], annotations=[a for _, an in reps for a in an], categories=d['categories'])))
    return root

@pytest.mark.skipif(not (SHARED / 'balloon').exists(), reason='shared/data/balloon not found beside the repository')
def test_detector_learns_balloon(tmp_path):
    """`train_detection` (the path of `fastconvmae detect train`) from random weights on 8 balloon photos reaches box AP50 > 90 on
    the same photos: targets, losses, post-processing and evaluation fit together. Tiny backbone, 128 px, the preset's 'auto' precision (bf16 on
    AMX / AVX512-BF16 CPUs, else fp32), fixed seed."""
    from fastconvmae.detection import train_detection
    import time
    data = _balloon_8(tmp_path / 'balloon8', repeat=40)                  # 80 steps of 4 photos per epoch: 3 epochs, 3 validations
    t0 = time.time()
    train_detection(data, 'cpu', output=tmp_path / 'run', seed=0, console=False, img_size=128, window_size=4, bs=4, lr=5e-4,
                    max_iter=240, warmup_iters=10, scale=(1., 1.), drop_path_rate=0., box_batch_size_per_image=16,
                    rpn_post_nms_top_n_train=50, rpn_post_nms_top_n_test=50, box_detections_per_img=20)
    st = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['stats']
    print(f"balloon-8 learning check: box AP50 {st['bbox']['AP50']:.1f}, mask AP50 {st['segm']['AP50']:.1f} in {time.time() - t0:.0f} s")
    assert st['bbox']['AP50'] > 90, st
