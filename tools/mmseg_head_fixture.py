"""Build tests/fixtures/mmseg_heads_tiny.pt: the output of mmsegmentation's own `UPerHead` and `FCNHead` on the official
backbone maps of tests/fixtures/official_seg_tiny.pt, with that fixture's `decode_head.*` / `auxiliary_head.*` weights.
A parity test then runs this package's heads on the same maps and compares the logits.

Needs mmsegmentation 1.2.2, mmcv-lite 2.1.0 and mmengine 0.10.7 (plus their pure-Python deps: opencv-python-headless,
addict, yapf, termcolor, prettytable, ftfy, regex) on PYTHONPATH, for example in a throwaway folder:

    pip install --no-deps --target /tmp/mm mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine==0.10.7 \
        opencv-python-headless addict yapf termcolor prettytable ftfy regex platformdirs wcwidth
    PYTHONPATH=/tmp/mm python tools/mmseg_head_fixture.py

mmcv-lite has no compiled ops; the heads do not use them, so `mmcv.ops` is a stand-in that fails if anything calls it.
The heads are configured as in the official SEG config (`upernet_convmae_base_512_slide_160k_ade20k.py`): UPerHead on
maps 0..3 with pool scales (1, 2, 3, 6), FCNHead on map 2 with one conv and no input concatenation, dropout 0.1,
align_corners False; SyncBN there is BN here (the same function in eval mode), at the fixture's tiny widths."""
import argparse, importlib.util, sys, types, warnings
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]

class _Stub(types.ModuleType):
    "`mmcv.ops` stand-in: importable, and any op it hands out raises when built"
    def __getattr__(self, name):
        if name.startswith('__'): raise AttributeError(name)
        def fail(*a, **k): raise RuntimeError(f'mmcv.ops.{name} is a stand-in (mmcv-lite has no compiled ops)')
        return type(name, (), {'__init__': fail})

def main(out=ROOT/'tests'/'fixtures'/'mmseg_heads_tiny.pt'):
    for m in ('mmcv.ops', 'mmcv._ext'): sys.modules[m] = _Stub(m)
    warnings.filterwarnings('ignore')
    import mmseg, mmcv, mmengine
    from mmseg.models.decode_heads.uper_head import UPerHead
    from mmseg.models.decode_heads.fcn_head import FCNHead
    spec = importlib.util.spec_from_file_location('odf', ROOT/'tools'/'official_downstream_fixtures.py')
    odf = importlib.util.module_from_spec(spec); spec.loader.exec_module(odf)
    fx = torch.load(ROOT/'tests'/'fixtures'/'official_seg_tiny.pt', weights_only=True)
    c, sd = fx['config'], odf.materialise(fx['checkpoint'])['state_dict']
    chans, K, ai = c['feature_channels'], c['num_classes'], c['aux_index']
    bn = dict(type='BN', requires_grad=True)
    dec = UPerHead(in_channels=chans, in_index=[0, 1, 2, 3], pool_scales=tuple(c['pool_scales']), channels=c['decode_channels'],
                   dropout_ratio=0.1, num_classes=K, norm_cfg=bn, align_corners=False)
    aux = FCNHead(in_channels=chans[ai], in_index=ai, channels=c['aux_channels'], num_convs=1, concat_input=False,
                  dropout_ratio=0.1, num_classes=K, norm_cfg=bn, align_corners=False)
    for name, head in (('decode_head', dec), ('auxiliary_head', aux)):
        w = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + '.')}
        head.load_state_dict(w, strict=True)          # every tensor of the official layout, and nothing else
        head.eval()
    torch.set_num_threads(1)
    feats = [f.float() for f in fx['features']]
    with torch.no_grad(): d, a = dec(feats), aux(feats)
    torch.save(dict(decode_logits=d, aux_logits=a, source=dict(
        mmsegmentation=mmseg.__version__, mmcv=mmcv.__version__, mmengine=mmengine.__version__, torch=torch.__version__.split('+')[0],
        heads="mmseg.models.decode_heads.UPerHead / FCNHead, eval mode, on official_seg_tiny.pt's `features` and "
              "`decode_head.*` / `auxiliary_head.*` weights")), out)
    print(f'wrote {out.relative_to(ROOT)}: decode {tuple(d.shape)}, aux {tuple(a.shape)}')

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0]); p.add_argument('--out', type=Path, default=None)
    a = p.parse_args(); main(*([a.out] if a.out else []))
