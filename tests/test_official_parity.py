"""Parity of the detection and segmentation backbones with the official Alpha-VL/ConvMAE code (`DET/models/convmae.py`,
`SEG/backbone/convmae.py`): the fixtures in tests/fixtures hold official-layout checkpoints (detectron2, mmseg) and the
official feature maps, made by tools/official_downstream_fixtures.py (see tests/fixtures/README.md)."""
import importlib.util
from pathlib import Path
import pytest, torch
from fastconvmae.backbone import convvit_det, load_backbone, resize_pos_embed
from fastconvmae.segmentation import load_segmenter
from fastconvmae.models import rel_err

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT/'tests'/'fixtures'
TOL = 1e-5

def _materialise(obj):
    spec = importlib.util.spec_from_file_location('odf', ROOT/'tools'/'official_downstream_fixtures.py')
    odf = importlib.util.module_from_spec(spec); spec.loader.exec_module(odf)
    return odf.materialise(obj)

@pytest.fixture(scope='module')
def det(): return torch.load(FIX/'official_det_tiny.pt', weights_only=True)

@pytest.fixture(scope='module')
def seg(): return torch.load(FIX/'official_seg_tiny.pt', weights_only=True)

def _det_backbone(fx, **kw):
    c = fx['config']
    return convvit_det('base', img_size=256, window_size=8, embed_dim=(32, 48, 96), depth=(2, 2, 11), num_heads=12,
                       drop_path_rate=0., **kw).eval()

def test_det_backbone_from_a_detectron2_file_matches_the_official_maps(det, tmp_path):
    torch.save(_materialise(det['checkpoint']), tmp_path/'model_final.pth')
    bb = _det_backbone(det)
    rep = load_backbone(bb, tmp_path/'model_final.pth', verbose=False)
    assert rep.initialised == [] and rep.layout.startswith('detectron2')
    assert all(k.startswith(('backbone.fpn_', 'proposal_generator.', 'roi_heads.')) for ks in rep.dropped.values() for k in ks)
    assert not bb.pos_embed.requires_grad                              # official: frozen
    with torch.no_grad(): out = bb(det['image'])
    assert list(out) == det['feature_names']
    for k, v in det['features'].items(): assert rel_err(out[k], v) < TOL, (k, rel_err(out[k], v))

def test_det_pos_embed_is_the_official_resize_of_the_pretraining_one(det):
    official = det['checkpoint']['model']['backbone.bottom_up.pos_embed']
    assert torch.equal(resize_pos_embed(det['pretrain_pos_embed'], (16, 16)), official)
    bb = _det_backbone(det)                                          # from a pretraining checkpoint: the same resize
    load_backbone(bb, {'model': {**{k[len('backbone.bottom_up.'):]: v for k, v in det['checkpoint']['model'].items()
                                   if k.startswith('backbone.bottom_up.') and 'rel_pos_bias' not in k},
                                 'pos_embed': det['pretrain_pos_embed']}}, verbose=False)
    assert torch.equal(bb.pos_embed.detach(), official)

def test_seg_backbone_from_an_mmseg_file_matches_the_official_maps(seg, tmp_path):
    torch.save(_materialise(seg['checkpoint']), tmp_path/'iter_160000.pth')
    model, rec = load_segmenter(tmp_path/'iter_160000.pth')           # the reader of `fastconvmae segment evaluate`
    assert rec['num_classes'] == 3 and rec['recipe']['crop'] == 128
    bb = model.backbone
    assert bb.blocks3[0].norm1.eps == 1e-5 and bb.fpn[0].padding == (0, 0)
    with torch.no_grad(): out = list(bb(seg['image']).values())
    for i, (a, b) in enumerate(zip(out, seg['features'])):
        assert a.shape == b.shape and rel_err(a, b) < TOL, (i, a.shape, b.shape)

def test_zeroed_tables_or_layer_scales_would_be_caught(seg, tmp_path):
    "The fixture is sensitive: dropping what a careless loader drops moves the maps far beyond the tolerance."
    ck = _materialise(seg['checkpoint'])
    for k in ck['state_dict']:
        if k.endswith(('gamma_1', 'gamma_2')): ck['state_dict'][k] = torch.ones_like(ck['state_dict'][k])
    torch.save(ck, tmp_path/'f.pth')
    model, _ = load_segmenter(tmp_path/'f.pth')
    with torch.no_grad(): out = list(model.backbone(seg['image']).values())
    assert rel_err(out[3], seg['features'][3]) > 1e-2

def test_seg_heads_match_mmsegmentation(seg, tmp_path):
    "UPerHead and FCNHead on the official maps, with the mmseg checkpoint's head weights: the logits of mmsegmentation's own heads (tests/fixtures/mmseg_heads_tiny.pt, made by tools/mmseg_head_fixture.py with mmsegmentation 1.2.2)."
    ref = torch.load(FIX/'mmseg_heads_tiny.pt', weights_only=True)
    torch.save(_materialise(seg['checkpoint']), tmp_path/'iter_160000.pth')
    model, _ = load_segmenter(tmp_path/'iter_160000.pth')
    feats = list(seg['features'])
    with torch.no_grad(): d, a = model.decode_head(feats), model.auxiliary_head(feats[seg['config']['aux_index']])
    assert d.shape == ref['decode_logits'].shape and a.shape == ref['aux_logits'].shape
    assert rel_err(d, ref['decode_logits']) < TOL and rel_err(a, ref['aux_logits']) < TOL, (rel_err(d, ref['decode_logits']), rel_err(a, ref['aux_logits']))
    assert ref['decode_logits'].std() > 0.1                            # not a degenerate (constant) reference
