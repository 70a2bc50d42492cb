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

def _tiny(norm_pix_loss, complementary=True):
    return models.MaskedAutoencoderConvViT(img_size=64, embed_dim=(16, 24, 48), depth=(1, 1, 2), num_heads=4,
                                           decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
                                           norm_pix_loss=norm_pix_loss, complementary=complementary).eval()

def test_reconstruct_raw_pixels_is_the_prediction():
    m, x, noise = _tiny(False), torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    masked, rec, pasted = models.reconstruct(m, x, noise=noise)          # default 'pixels' for a raw-pixel model
    assert masked.shape == rec.shape == pasted.shape == (4, 2, 3, 64, 64)
    _, pred, mask = m(x, noise=noise)
    assert torch.allclose(rec, m.unpatchify(pred).unflatten(0, (4, 2)), atol=1e-6)
    vis = 1 - models.upsample_mask(mask.unflatten(0, (4, 2)), (4, 4), 16)[:, :, None]
    assert torch.equal(pasted * vis, x * vis) and torch.equal(masked * (1 - vis), torch.zeros_like(masked))
    with pytest.raises(ValueError, match='norm_pix_loss'): models.reconstruct(m, x, space='borrowed')
    with pytest.raises(ValueError, match='space must be'): models.reconstruct(m, x, space='rgb')

def test_reconstruct_norm_pix_spaces():
    m, x, noise = _tiny(True), torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    _, pred, _ = m(x, noise=noise)
    t = models.patchify(x)
    masked, rec, pasted = models.reconstruct(m, x, noise=noise)          # default 'normalised' for a norm-pix model
    assert torch.allclose(rec, m.unpatchify(pred).unflatten(0, (4, 2)), atol=1e-6)
    # the visible patches are shown in the target's units: each patch has mean 0 and variance 1
    target = m.unpatchify(models.normalise_patches(t))
    assert torch.allclose(masked.sum(0), target, atol=1e-5)               # the K views' visible patches tile the target
    # 'borrowed' uses the hidden patches' own mean and std: the old behaviour, now opt-in
    _, b, _ = models.reconstruct(m, x, noise=noise, space='borrowed')
    sd, mu = (t.var(-1, keepdim=True) + 1e-6) ** .5, t.mean(-1, keepdim=True)
    assert torch.allclose(b, m.unpatchify((pred.unflatten(0, (4, 2)) * sd + mu).flatten(0, 1)).unflatten(0, (4, 2)), atol=1e-5)

def test_show_views_one_and_k_views():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    for comp, n_axes in [(False, 4), (True, 15)]:
        m, x = _tiny(False, comp), torch.randn(1, 3, 64, 64)
        fig = models.show_views(x, *models.reconstruct(m, x))
        assert len(fig.axes) == n_axes and fig.get_size_inches()[0] * fig.dpi >= 600
        plt.close(fig)

def test_pretraining_checkpoint_round_trip(tmp_path):
    from fastconvmae import visualise as V
    m = models.create_model('fastconvmae_convvit_tiny_patch16', img_size=64, norm_pix_loss=False)
    torch.save({'model': m.state_dict(), 'recipe': dict(arch='fastconvmae_convvit_tiny_patch16', img_size=64,
                                                        norm_pix_loss=False, mask_ratio=0.75)}, tmp_path / 'v.pth')
    m2 = V.load_model(tmp_path / 'v.pth')
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    x = torch.randn(2, 3, 96, 64)                                          # another size: dynamic_img_size
    c = V.as_convmae(m2)
    assert not c.complementary and m2.complementary
    feats, hw = V.stage3_tokens(m2, x)
    assert feats.shape == (2, 24, 192) and hw == (6, 4)
    rgb = V.pca_rgb(feats, hw)
    assert rgb.shape == (2, 6, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    att = V.stage3_attention(m2, x, block=0)
    assert att.shape == (2, 3, 24, 24) and torch.allclose(att.sum(-1), torch.ones(2, 3, 24), atol=1e-5)
