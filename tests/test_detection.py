"Mask R-CNN on ConvViT: COCO data with LSJ, the model, COCO evaluation, training with resume, and the command line."
import json, os, subprocess, sys, warnings
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

def _learner(root, out, epochs=2, precision='bf16'):
    r = DetectionRecipe(arch='tiny', img_size=64, window_size=2, epochs=epochs, bs=4, lr=2e-4, warmup_epochs=0.5, precision=precision,
                        rpn_post_nms_top_n_train=32, rpn_post_nms_top_n_test=16, box_batch_size_per_image=16, box_detections_per_img=10)
    torch.manual_seed(0)
    learn = detection_learner(coco_dls(root, 64, 4, seed=0), r, output=out, verbose=False)
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
