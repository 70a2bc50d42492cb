"API-level tests of the exported package (the notebooks test the pieces)."
import pytest, torch, timm
import fastconvmae
from fastconvmae import models

def test_timm_registration():
    m = timm.create_model('convvit_base_patch16', num_classes=10)
    assert m.head.out_features == 10 and m.pos_embed.shape == (1, 196, 768)
    assert 'convvit_tiny_patch16' in timm.list_models('convvit*')

@pytest.mark.parametrize('name', ['convmae_convvit_base_patch16', 'fastconvmae_convvit_base_patch16'])
def test_official_names_and_defaults(name):
    m = getattr(models, name)()
    sd = m.state_dict()
    assert sd['blocks1.0.attn.weight'].shape == (256, 1, 5, 5)
    assert sd['blocks3.10.attn.qkv.weight'].shape == (2304, 768)
    assert 'blocks3.11.norm1.weight' not in sd
    assert sd['decoder_pred.weight'].shape == (768, 512)
    assert len(m.decoder_blocks) == 8 and m.complementary == name.startswith('fast')
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad

def test_overrides_and_official_img_size_list():
    m = models.fastconvmae_convvit_base_patch16(img_size=[128, 32, 16], embed_dim=[32, 48, 96], depth=[1, 1, 1],
                                                num_heads=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                                                norm_pix_loss=True)
    loss, pred, mask = m(torch.randn(2, 3, 128, 128), mask_ratio=0.75)
    assert pred.shape == (8, 64, 768) and mask.shape == (8, 64) and torch.isfinite(loss)

def test_noise_makes_masks_reproducible():
    m = models.convmae_convvit_tiny_patch16(img_size=64)
    noise = torch.rand(2, 16)
    _, _, m1 = m(torch.randn(2, 3, 64, 64), noise=noise)
    _, _, m2 = m(torch.randn(2, 3, 64, 64), noise=noise)
    assert torch.equal(m1, m2)

def test_create_model_unknown_name():
    with pytest.raises(ValueError, match='unknown model'):
        models.create_model('convmae_vit_huge')
