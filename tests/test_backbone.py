"The multi-scale ConvViT backbone (detection and segmentation configurations) and timm feature extraction."
import pytest, torch, timm
from fastconvmae.encoder import convvit_base_patch16, convvit_small_patch16, convvit_tiny_patch16
from fastconvmae.backbone import (ConvViTBackbone, convvit_det, convvit_seg, load_backbone, window_partition,
                                  window_unpartition, RelativePositionBias, relative_position_index, resize_pos_embed)
from fastconvmae.finetune import CheckpointMismatchError
from fastconvmae.models import create_model

def _perturb(m, std=0.02):
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * std)

def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 16, 5)
    assert torch.equal(w[0], x[0, :4, :4].reshape(16, 5))
    assert torch.equal(window_unpartition(w, 4, (8, 12)), x)

def test_window_equal_to_grid_matches_global_blocks():
    torch.manual_seed(0)
    win = convvit_det('tiny', img_size=128, window_size=8, global_blocks=(1,)).eval()
    glob = convvit_det('tiny', img_size=128, window_size=None).eval()
    _perturb(win)
    with torch.no_grad():
        win.global_rel_pos_bias.relative_position_bias_table.copy_(win.windowed_rel_pos_bias.relative_position_bias_table)
    glob.load_state_dict({k: v for k, v in win.state_dict().items() if not k.startswith('windowed_')})
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad(): a, b = win(x), glob(x)
    for k in a: torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)
    small = convvit_det('tiny', img_size=128, window_size=4, global_blocks=(1,)).eval()
    small.load_state_dict({k: v for k, v in win.state_dict().items() if not k.startswith('windowed_')}, strict=False)
    with torch.no_grad(): assert (small(x)['s2'] - a['s2']).abs().max() > 1e-3  # smaller windows really change the output

@pytest.mark.parametrize('hw', [(128, 64), (64, 192), (256, 128)])
def test_det_shapes_strides_non_square(hw):
    bb = convvit_det('tiny', img_size=128, window_size=2).eval()
    with torch.no_grad(): out = bb(torch.randn(1, 3, *hw))
    assert list(out) == ['s0', 's1', 's2', 's3']
    for (k, v), f in zip(out.items(), bb.feature_info):
        assert v.shape[1] == f['num_chs']
        assert v.shape[-2:] == (hw[0] // f['reduction'], hw[1] // f['reduction'])

def test_seg_shapes_official_unpadded_s3():
    bb = convvit_seg('tiny', img_size=96).eval()
    assert bb.blocks3[0].ls1.gamma.eq(1).all() and isinstance(bb.fpn[1], torch.nn.BatchNorm2d)
    assert bb.blocks3[-1].drop_path1.drop_prob == pytest.approx(0.2)  # official segmentation drop path
    assert bb.blocks3[0].norm1.eps == 1e-5 and bb.fpn[0].padding == (0, 0)   # official SEG: nn.LayerNorm default, no padding
    with torch.no_grad(): out = bb(torch.randn(2, 3, 160, 96))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(40, 24), (20, 12), (10, 6), (4, 2)]
    assert convvit_seg('tiny', img_size=512)(torch.randn(1, 3, 512, 512))['s3'].shape[-2:] == (15, 15)  # as the official 512 px crop
    padded = convvit_seg('tiny', img_size=96, s3_padding=1).eval()
    with torch.no_grad(): assert padded(torch.randn(1, 3, 160, 96))['s3'].shape[-2:] == (5, 3)
    assert [v.shape[1] for v in out.values()] == [64, 96, 192, 192]

def test_bad_inputs_are_clear_errors():
    bb = convvit_det('tiny', img_size=128, window_size=4)
    with pytest.raises(ValueError, match='not a multiple of window_size'): bb(torch.randn(1, 3, 144, 128))
    with pytest.raises(ValueError, match='not a multiple of window_size'): convvit_det('tiny', img_size=96, window_size=4)
    with pytest.raises(ValueError, match='divisible by 16'): bb(torch.randn(1, 3, 120, 128))

def test_relative_position_bias_resampled_for_other_grids():
    rpb = RelativePositionBias((4, 4), 3)
    with torch.no_grad(): rpb.relative_position_bias_table.uniform_()
    assert rpb().shape == (3, 16, 16) and rpb((6, 2)).shape == (3, 12, 12)
    idx = relative_position_index(4, 4)
    assert torch.equal(rpb(), rpb.relative_position_bias_table[idx.view(-1)].view(16, 16, 3).permute(2, 0, 1))

def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = convvit_det('tiny', img_size=64, window_size=2, drop_path_rate=0.)
    b = convvit_det('tiny', img_size=64, window_size=2, drop_path_rate=0., grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for m in (a, b): sum(v.square().mean() for v in m(x).values()).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None: torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)

def test_no_weight_decay_names_tables_and_pos_embed():
    assert convvit_det('tiny', img_size=64, window_size=2).no_weight_decay() == {
        'pos_embed', 'windowed_rel_pos_bias.relative_position_bias_table', 'global_rel_pos_bias.relative_position_bias_table'}
    assert len(convvit_seg('tiny', img_size=64).no_weight_decay()) == 1 + 6

def test_load_pretraining_checkpoint_of_this_package(tmp_path):
    pre = create_model('fastconvmae_convvit_tiny_patch16', img_size=96)
    _perturb(pre)
    path = tmp_path / 'checkpoint-latest.pth'
    torch.save(dict(model={'module.' + k: v for k, v in pre.state_dict().items()}, epoch=3, optimizer={}), path)
    det = convvit_det('tiny', img_size=128, window_size=4)
    rep = load_backbone(det, path, verbose=False)
    sd = pre.state_dict()
    for k in ('patch_embed1.proj.weight', 'blocks1.0.attn.weight', 'blocks3.5.mlp.fc2.bias', 'patch_embed4.weight'):
        assert torch.equal(det.state_dict()[k], sd[k])
    assert set(rep.initialised) == {'windowed_rel_pos_bias.relative_position_bias_table', 'global_rel_pos_bias.relative_position_bias_table'}
    assert torch.equal(det.pos_embed, resize_pos_embed(sd['pos_embed'], (8, 8))) and not det.pos_embed.requires_grad
    assert any('decoder_pred.weight' in ks for ks in rep.dropped.values())
    seg = convvit_seg('tiny', img_size=128)
    load_backbone(seg, path, verbose=False)
    assert seg.pos_embed.shape == (1, 64, 192) and seg.pos_embed.requires_grad
    with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
        load_backbone(convvit_det('small', img_size=128, window_size=4), path, verbose=False)

def test_load_mor_checkpoint_ignores_teachers():
    from fastconvmae.mor import mor_model, MoRRecipe
    m = mor_model(MoRRecipe(arch='fastconvmae_convvit_tiny_patch16', img_size=64, targets=('pixel', 'ema')))
    sd = m.state_dict()
    assert any(k.startswith('teachers.') for k in sd)
    det = convvit_det('tiny', img_size=64, window_size=2)
    load_backbone(det, dict(model=sd), verbose=False)
    assert torch.equal(det.state_dict()['blocks3.0.attn.qkv.weight'], sd['blocks3.0.attn.qkv.weight'])

@pytest.mark.parametrize('factory', [convvit_base_patch16, convvit_small_patch16, convvit_tiny_patch16])
def test_official_three_list_img_size(factory):
    m = factory(img_size=[224, 56, 28], num_classes=0)
    assert m.img_size == (224, 224) and m.grid == (14, 14)

def test_timm_features_only():
    fm = timm.create_model('convvit_tiny_patch16', features_only=True, img_size=(96, 64))
    assert fm.feature_info.channels() == [64, 96, 192] and fm.feature_info.reduction() == [4, 8, 16]
    feats = fm(torch.randn(2, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 24, 16), (2, 96, 12, 8), (2, 192, 6, 4)]
    fm = timm.create_model('convvit_tiny_patch16', features_only=True, out_indices=(0, 2), img_size=64)
    assert fm.feature_info.channels() == [64, 192] and fm.feature_info.reduction() == [4, 16]
    assert [f.shape[1] for f in fm(torch.randn(1, 3, 64, 64))] == [64, 192]
    full = timm.create_model('convvit_tiny_patch16', img_size=64, num_classes=0).eval()
    fm.model.load_state_dict(full.state_dict(), strict=False)
    fm.eval()
    with torch.no_grad(): torch.testing.assert_close(fm(torch.randn(1, 3, 64, 64).fill_(0.5))[1].mean((2, 3)),
                                                      full.forward_features(torch.randn(1, 3, 64, 64).fill_(0.5)).mean(1))
