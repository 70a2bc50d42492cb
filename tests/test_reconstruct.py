"""The teaching weights that ship in `data/weights/`, the ways they load (the package's reader and timm), and
`fastconvmae_reconstruct`, the MAE demo for any photo, through the installed console script."""
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch, timm
from safetensors.torch import save_file
from fastconvmae import models
from fastconvmae.models import load_weights, read_weights, weights_dir, TEACHING_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PHOTOS = REPO / 'data'

def _toy_weights(path, comp=True, **recipe):
    "A random tiny model's weights in the shipped format (fp16, recipe in the metadata)."
    arch = f"{'fast' if comp else ''}convmae_convvit_tiny_patch16"
    r = dict(arch=arch, img_size=64, norm_pix_loss=False, mask_ratio=0.75, **recipe)
    m = models.create_model(arch, img_size=64)
    save_file({k: v.half() for k, v in m.state_dict().items()}, str(path), metadata=dict(recipe=json.dumps(r), command='test'))
    return m

# ---------------------------------------------------------------- the shipped weights
@pytest.mark.parametrize('method', ['fastconvmae', 'convmae'])
def test_shipped_teaching_weights(method):
    "Both teaching models ship, under 10 MB, say how they were trained, and are trained (not an initialisation)."
    f = weights_dir() / f'{TEACHING_WEIGHTS[method]}.safetensors'
    assert f.is_file() and f.stat().st_size <= 10e6, f
    assert (weights_dir() / f'{TEACHING_WEIGHTS[method]}.log.csv').is_file()
    m = load_weights(method)
    r = json.loads(m.weights_meta['recipe'])
    assert r['arch'] == f'{method}_convvit_tiny_patch16' and r['norm_pix_loss'] is False and m.complementary == (method == 'fastconvmae')
    assert m.weights_meta['command'].startswith('fastconvmae_pretrain ') and int(m.weights_meta['epochs_trained']) >= 10
    assert not m.training and m.img_size == (96, 96)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 36, generator=torch.Generator().manual_seed(0))
    fresh = models.create_model(r['arch'], img_size=96, norm_pix_loss=False).eval()
    with torch.no_grad(): assert not torch.allclose(m(x, 0.75, noise)[1], fresh(x, 0.75, noise)[1], atol=1e-2)

def test_timm_loads_the_same_weights(tmp_path):
    "`timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))` gives `load_weights`' model; at another size the fixed sin-cos tables are the exact ones of that grid."
    f = tmp_path / 'w.safetensors'
    _toy_weights(f)
    ours = load_weights(f)
    t = timm.create_model('fastconvmae_convvit_tiny_patch16', pretrained=True, img_size=64, pretrained_cfg_overlay=dict(file=str(f)))
    for k, v in ours.state_dict().items(): assert torch.equal(t.state_dict()[k], v), k
    big = timm.create_model('fastconvmae_convvit_tiny_patch16', pretrained=True, img_size=128, pretrained_cfg_overlay=dict(file=str(f)))
    ref = models.create_model('fastconvmae_convvit_tiny_patch16', img_size=128)
    assert torch.equal(big.pos_embed, ref.pos_embed) and torch.equal(big.decoder_pos_embed, ref.decoder_pos_embed)
    assert torch.equal(big.blocks3[0].attn.qkv.weight, ours.blocks3[0].attn.qkv.weight)

def test_load_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='weights not found'): load_weights(tmp_path / 'none.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'junk junk junk')
    with pytest.raises(ValueError, match='not a safetensors file'): read_weights(tmp_path / 'junk.safetensors')
    save_file({'a': torch.zeros(2)}, str(tmp_path / 'bare.safetensors'))
    with pytest.raises(ValueError, match='does not name its model'): load_weights(tmp_path / 'bare.safetensors')

# ---------------------------------------------------------------- fastconvmae_reconstruct
def cli(*args, cwd, timeout=300):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run([str(BIN / 'fastconvmae_reconstruct'), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)

def error_line(r, *needles):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (r.returncode, r.stderr[-2000:])
    for n in needles: assert n in lines[0], lines[0]

needs_script = pytest.mark.skipif(not (BIN / 'fastconvmae_reconstruct').exists(), reason='console scripts not installed (pip install -e .)')

@needs_script
def test_reconstruct_command_writes_and_never_replaces(tmp_path):
    r = cli(PHOTOS / 'chelsea.jpg', PHOTOS / 'camera.jpg', cwd=tmp_path)          # an RGB and a greyscale photo
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / 'runs' / 'reconstruct'
    assert sorted(p.name for p in out.iterdir()) == ['camera.png', 'chelsea.png'] and 'figure(s) in' in r.stdout
    before = (out / 'chelsea.png').read_bytes()
    error_line(cli(PHOTOS / 'chelsea.jpg', '--checkpoint', 'convmae', cwd=tmp_path), 'chelsea.png', '--overwrite')
    assert (out / 'chelsea.png').read_bytes() == before                           # refused: untouched
    r = cli(PHOTOS / 'chelsea.jpg', '--checkpoint', 'convmae', '--seed', '1', '--overwrite', cwd=tmp_path)
    assert r.returncode == 0 and (out / 'chelsea.png').read_bytes() != before, r.stderr[-2000:]

@needs_script
def test_reconstruct_command_user_mistakes(tmp_path):
    "Each mistake is one `error:` line, exit 2, and nothing written."
    (tmp_path / 'bad.jpg').write_text('not a photo')
    error_line(cli('missing.jpg', cwd=tmp_path), 'image not found: missing.jpg')
    error_line(cli(tmp_path / 'bad.jpg', cwd=tmp_path), 'cannot read image')
    error_line(cli(PHOTOS / 'chelsea.jpg', '--mask_ratio', '0.7', cwd=tmp_path), '--mask_ratio 0.7', 'whole number of views')
    error_line(cli(PHOTOS / 'chelsea.jpg', '--checkpoint', tmp_path / 'bad.jpg', cwd=tmp_path), 'not a PyTorch checkpoint')
    error_line(cli(PHOTOS / 'chelsea.jpg', '--out', 'x', cwd=tmp_path), 'unrecognized arguments: --out', 'did you mean --output?')
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'x').exists()

@needs_script
def test_reconstruct_command_from_a_pretraining_checkpoint(tmp_path):
    "A pretraining run's checkpoint (model + recipe) works as --checkpoint; a ConvMAE one draws one row, at --img_size."
    m = models.create_model('convmae_convvit_tiny_patch16', img_size=64)
    torch.save(dict(model=m.state_dict(), epoch=0, recipe=dict(arch='convmae_convvit_tiny_patch16', img_size=64,
                                                               norm_pix_loss=True, mask_ratio=0.75)), tmp_path / 'ck.pth')
    r = cli(PHOTOS / 'rocket.jpg', '--checkpoint', tmp_path / 'ck.pth', '--img_size', 80, '--output', 'o', cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / 'o' / 'rocket.png').is_file(), r.stderr[-2000:]
    from PIL import Image
    w, h = Image.open(tmp_path / 'o' / 'rocket.png').size
    assert w > 2.5 * h                                                            # one row of four panels
    torch.save({'model': m.state_dict()}, tmp_path / 'no_recipe.pth')
    error_line(cli(PHOTOS / 'rocket.jpg', '--checkpoint', tmp_path / 'no_recipe.pth', cwd=tmp_path), 'not a pretraining checkpoint')
