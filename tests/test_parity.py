"Parity with the official Alpha-VL code, on the fixtures in ../shared/fixtures (REFERENCE.md section 6)."
from functools import partial
import pytest, torch, torch.nn as nn
from fastconvmae.models import ConvViT, model_from_fixture_config, rel_err

TOL = 1e-5

@pytest.mark.parametrize('name,complementary', [('official_convmae_tiny', False), ('official_fastconvmae_tiny', True)])
def test_pretrain_parity(fixtures_dir, name, complementary):
    d = torch.load(fixtures_dir / f'{name}.pt', weights_only=False)
    model = model_from_fixture_config(d['config'], complementary)
    model.load_state_dict(d['state_dict'], strict=True)
    loss, pred, mask = model(d['imgs'], mask_ratio=d['config']['mask_ratio'], noise=d['noise'])
    assert pred.shape == d['pred'].shape and mask.shape == d['mask'].shape
    assert torch.equal(mask, d['mask'])
    assert rel_err(loss.detach(), d['loss']) < TOL
    assert rel_err(pred.detach(), d['pred']) < TOL
    loss.backward()
    params = dict(model.named_parameters())
    assert d['grads'], 'fixture lists no gradients'
    for k, g in d['grads'].items():
        assert rel_err(params[k].grad, g) < TOL, k
    # and our state dict has exactly the official names and shapes
    ours = model.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in d['state_dict'].items()}

def test_classifier_parity(fixtures_dir):
    d = torch.load(fixtures_dir / 'official_convvit_tiny_cls.pt', weights_only=False)
    c = d['config']
    m = ConvViT(img_size=c['img_size'], patch_size=c['patch_size'], embed_dim=c['embed_dim'], depth=c['depth'],
                num_heads=c['num_heads'], mlp_ratio=c['mlp_ratio'], qkv_bias=c['qkv_bias'], num_classes=c['num_classes'],
                global_pool=c['global_pool'], norm_layer=partial(nn.LayerNorm, eps=c['norm_layer_eps'])).eval()
    m.load_state_dict(d['state_dict'], strict=True)
    with torch.no_grad(): logits = m(d['imgs'])
    assert rel_err(logits, d['logits']) < TOL
