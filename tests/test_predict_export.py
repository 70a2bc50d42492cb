"""`fastconvmae predict` and `fastconvmae export` as a user meets them: the commands run in a subprocess (as
`python -m fastconvmae.predict` / `.export`, which is what the console scripts call), on a toy classifier fine-tuned
in seconds (the teaching weights on the five bundled photos, each its own class, 64 px), a linear probe, and a real
pretraining checkpoint of one epoch. The rarer mistakes go through `main()` in this process (same parser, same code)."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / 'data'
TEACH = DATA / 'weights' / 'fastconvmae_convvit_tiny_patch16.imagenette_96px.safetensors'
NAMES = dict(astronaut='astronaut', camera='cameraman', chelsea='cat', coffee='coffee cup', rocket='rocket')
CLASSES = sorted(NAMES.values())
ENV = {**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'HF_HUB_OFFLINE': '1'}


def command(task, *args, cwd):
    "Run `python -m fastconvmae.<task> args` in `cwd`, output to pipes"
    return subprocess.run([sys.executable, '-m', f'fastconvmae.{task}', *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def in_process(main, *argv, capsys):
    "`main()` parsing `argv` as the console script does: (exit status, stdout, stderr)"
    old, sys.argv = sys.argv, ['prog', *map(str, argv)]
    try:
        main(); code = 0
    except SystemExit as e: code = e.code
    finally: sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *needles, out=''):
    "A user mistake: exit status 2, exactly one `error: ...` line holding every needle, no traceback"
    assert code == 2, (code, out[-1000:], err[-2000:])
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err[-2000:]
    assert 'Traceback' not in err + out
    for n in needles: assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    "A toy dataset, a fine-tuned classifier (finetuned.pth), a linear probe (linprobe.pth) and a pretraining checkpoint"
    from fastconvmae.finetune import finetune
    from fastconvmae.linprobe import linprobe
    from fastconvmae.data import pretrain_dls
    from fastconvmae.pretrain import PretrainRecipe, pretrain_learner, fit_pretrain
    root = tmp_path_factory.mktemp('predict_export')
    for split, n in (('train', 4), ('val', 1)):
        for f, c in NAMES.items():
            d = root / 'five' / split / c; d.mkdir(parents=True, exist_ok=True)
            for i in range(n): shutil.copy(DATA / f'{f}.jpg', d / f'{f}_{i}.jpg')
    quiet = dict(verbose=False, img_size=64, precision='fp32', num_workers=0, warmup_epochs=0)
    learn = finetune(root / 'five', 'cpu', checkpoint=TEACH, reset_head=True, output_dir=root / 'ft', epochs=6, bs=4, lr=2e-3,
                     mixup=0., cutmix=0., aa='', reprob=0., smoothing=0., **quiet)
    probe = linprobe(root / 'five', 'cpu', checkpoint=TEACH, output_dir=root / 'lp', epochs=1, bs=4, **quiet)
    r = PretrainRecipe(img_size=64, bs=5, epochs=1, warmup_epochs=0, precision='fp32', norm_pix_loss=False)
    pl = pretrain_learner(pretrain_dls(DATA, img_size=64, bs=5, num_workers=0, valid=2, device='cpu'), r,
                          output=root / 'pre', figures=False, log=False)
    with pl.no_bar(), pl.no_logging(): fit_pretrain(pl)
    # this package's fine-tuning records the class names; a checkpoint written before it did has none
    ck = torch.load(root / 'ft' / 'finetuned.pth', weights_only=True)
    named = {**ck, 'config': {**ck['config'], 'classes': CLASSES}}
    torch.save(named, root / 'named.pth')
    torch.save({**ck, 'config': {k: v for k, v in ck['config'].items() if k != 'classes'}}, root / 'unnamed.pth')
    return dict(root=root, data=root / 'five', learn=learn, probe=probe, named=root / 'named.pth', unnamed=root / 'unnamed.pth',
                pre=root / 'pre' / 'checkpoint-latest.pth', latest=root / 'ft' / 'checkpoint-latest.pth',
                linprobe=root / 'lp' / 'linprobe.pth')


def parse(line):
    "`path: name p, name p, ...` -> (path, [(name, p), ...])"
    path, rest = line.rsplit(': ', 1)
    return path, [(pair.rsplit(' ', 1)[0], float(pair.rsplit(' ', 1)[1])) for pair in rest.split(', ')]


# ------------------------------------------------------------------------------------------------- predict
def test_predict_prints_the_top5_with_class_names(work):
    r = command('predict', 'five/val', '--checkpoint', work['named'], cwd=work['root'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ''
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    for line in lines:
        path, top = parse(line)
        assert path.startswith('five/val/') and len(top) == 5
        assert sorted(n for n, _ in top) == CLASSES                    # five classes: all of them, by name
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert top[0][0] == Path(path).parent.name                     # the toy classifier knows its photos


def test_predict_class_names_from_a_file_or_folder_else_indices(work, capsys):
    from fastconvmae.predict import main
    (work['root'] / 'names.txt').write_text('\n'.join(CLASSES) + '\n')
    img = work['data'] / 'val' / 'cat' / 'chelsea_0.jpg'
    for classes in (work['root'] / 'names.txt', work['data'], work['data'] / 'train'):
        code, out, err = in_process(main, img, '--checkpoint', work['unnamed'], '--classes', classes, '--topk', 2, capsys=capsys)
        assert code == 0 and parse(out.strip())[1][0][0] == 'cat', (out, err)
    code, out, _ = in_process(main, img, '--checkpoint', work['unnamed'], '--topk', 1, capsys=capsys)
    assert code == 0 and parse(out.strip())[1][0][0] == '2'          # no names anywhere: the class index
    code, out, _ = in_process(main, img, '--checkpoint', work['named'], '--json', '--topk', 3, capsys=capsys)
    res = json.loads(out)
    assert code == 0 and res['labels'][0] == 'cat' and res['indices'][0] == 2 and len(res['probs']) == 3
    assert res['path'] == str(img)


def test_predict_reproduces_the_validation_of_finetuning_and_of_the_linear_probe(work):
    "the same transform, weights and class order as the run's own validation: the same probabilities"
    from fastconvmae.predict import predict
    for learn, ck in ((work['learn'], work['named']), (work['learn'], work['latest']), (work['probe'], work['linprobe'])):
        probs, _ = learn.get_preds(dl=learn.dls.valid)
        res = predict(ck, work['data'] / 'val', topk=5, device='cpu')
        P = torch.zeros(len(res), 5)
        for i, r in enumerate(res): P[i, r['indices']] = torch.tensor(r['probs'])
        assert [Path(r['path']) for r in res] == list(learn.dls.valid_ds.files)
        torch.testing.assert_close(P, probs, atol=1e-5, rtol=1e-4)


def test_a_pretraining_checkpoint_is_named_as_such(work):
    r = command('predict', DATA / 'chelsea.jpg', '--checkpoint', work['pre'], cwd=work['root'])
    one_error_line(r.returncode, r.stderr, 'is a pretraining checkpoint, not a classifier: fine-tune it first',
                   'fastconvmae finetune', str(work['pre']), out=r.stdout)
    assert r.stdout == ''


@pytest.mark.parametrize('args, needles', [
    (['{chelsea}', '--checkpoint', '{teach}'], ['is a pretraining checkpoint, not a classifier']),
    (['{chelsea}', '--checkpoint', '{root}/missing.pth'], ['checkpoint not found', 'missing.pth']),
    (['{chelsea}', '--checkpoint', '{chelsea}'], ['is not a PyTorch checkpoint']),
    (['{readme}', '--checkpoint', '{named}'], ['README.md is not an image file']),
    (['{root}/nothing.jpg', '--checkpoint', '{named}'], ['image not found', 'nothing.jpg']),
    (['{chelsea}', '--checkpoint', '{named}', '--topk', '6'], ["--topk 6 is more than the classifier's 5 classes"]),
    (['{chelsea}', '--checkpoint', '{named}', '--topk', '0'], ['--topk must be a positive integer']),
    (['{chelsea}', '--checkpoint', '{named}', '--classes', '{root}/two.txt'], ['2 class names for a classifier of 5 classes']),
    (['{chelsea}', '--checkpoint', '{named}', '--device', 'gpu7'], ["--device 'gpu7' is not a device"]),
    (['{chelsea}'], ['the following arguments are required: --checkpoint']),
    (['{chelsea}', '--checkpoint', '{named}', '--top', '3'], ['unrecognized arguments: --top']),
])
def test_predict_user_mistakes_get_one_line(work, capsys, args, needles):
    from fastconvmae.predict import main
    (work['root'] / 'two.txt').write_text('a\nb\n')
    paths = dict(chelsea=DATA / 'chelsea.jpg', teach=TEACH, root=work['root'], readme=DATA / 'README.md', named=work['named'])
    code, out, err = in_process(main, *(a.format(**paths) for a in args), capsys=capsys)
    one_error_line(code, err, *needles, out=out)


def test_unreadable_images_named_or_found(work, capsys):
    "a damaged file found in a folder is skipped with a warning; named, it is an error"
    from fastconvmae.predict import main
    d = work['root'] / 'mixed'; d.mkdir(exist_ok=True)
    shutil.copy(DATA / 'rocket.jpg', d / 'rocket.jpg'); (d / 'broken.jpg').write_bytes(b'not a jpeg'); (d / 'notes.txt').write_text('x')
    from fastconvmae.data import BadImageWarning
    with pytest.warns(BadImageWarning, match='cannot read image .*broken.jpg.*skipped'):   # (pytest holds the warning line)
        code, out, err = in_process(main, d, '--checkpoint', work['named'], capsys=capsys)
    assert code == 0 and [parse(l)[0] for l in out.splitlines()] == [str(d / 'rocket.jpg')], (out, err)
    code, out, err = in_process(main, d / 'broken.jpg', '--checkpoint', work['named'], capsys=capsys)
    one_error_line(code, err, 'cannot read image', 'broken.jpg')


# -------------------------------------------------------------------------------------------------- export
def test_export_classifier_safetensors_and_onnx(work):
    import onnxruntime as ort, timm
    from fastconvmae.predict import load_classifier
    out = work['root'] / 'exp'
    r = command('export', '--checkpoint', work['named'], '--output', 'exp', cwd=work['root'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ''
    st, ox = out / 'convvit_tiny_patch16.safetensors', out / 'convvit_tiny_patch16.onnx'
    assert sorted(os.listdir(out)) == sorted([st.name, ox.name])
    assert [l.split(':')[0] for l in r.stdout.splitlines()] == [f'exp/{st.name}', f'exp/{ox.name}']
    model = load_classifier(work['named'], device='cpu')
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(): ref = model(x)
    # onnxruntime gives PyTorch's logits, at a batch size other than the traced one
    got = ort.InferenceSession(str(ox), providers=['CPUExecutionProvider']).run(None, {'image': x.numpy()})[0]
    diff = np.abs(got - ref.numpy()).max()
    assert diff < 1e-4, diff
    # timm's own loader rebuilds the classifier from the file: the very same outputs
    t = timm.create_model('convvit_tiny_patch16', pretrained=True, num_classes=5, img_size=64,
                          pretrained_cfg_overlay=dict(file=str(st), num_classes=5)).eval()
    with torch.inference_mode(): assert torch.equal(t(x), ref)
    assert t.pretrained_cfg['num_classes'] == 5
    # ... and the metadata say what it expects and what its outputs are called
    from safetensors import safe_open
    with safe_open(str(st), 'pt') as f: cfg = json.loads(f.metadata()['pretrained_cfg'])
    assert cfg['label_names'] == CLASSES and cfg['input_size'] == [3, 64, 64] and cfg['architecture'] == 'convvit_tiny_patch16'
    # the export is itself a classifier file for `predict`
    r = command('predict', DATA / 'chelsea.jpg', '--checkpoint', st, '--topk', 1, cwd=work['root'])
    assert r.returncode == 0 and parse(r.stdout.strip())[1][0][0] == 'cat', r.stderr[-2000:]


def test_export_refuses_to_overwrite(work):
    out = work['root'] / 'exp2'
    r = command('export', '--checkpoint', work['linprobe'], '--output', out, '--format', 'safetensors', cwd=work['root'])
    assert r.returncode == 0, r.stderr[-3000:]
    st = out / 'convvit_tiny_patch16.safetensors'
    before = st.stat().st_mtime_ns, st.read_bytes()
    r = command('export', '--checkpoint', work['linprobe'], '--output', out, '--format', 'safetensors', cwd=work['root'])
    one_error_line(r.returncode, r.stderr, 'already holds convvit_tiny_patch16.safetensors', '--overwrite', out=r.stdout)
    assert (st.stat().st_mtime_ns, st.read_bytes()) == before and os.listdir(out) == [st.name]
    from fastconvmae.export import export
    assert export(work['linprobe'], out, 'safetensors', overwrite=True, log=None) == [st]


def test_export_pretraining_checkpoint(work, capsys):
    "the whole autoencoder as safetensors (read back by `load_weights` and timm), its encoder as ONNX"
    import onnxruntime as ort, timm
    from fastconvmae.export import main, timm_kwargs
    from fastconvmae.models import load_weights
    from fastconvmae.checkpoint import load_pretrained
    from fastconvmae.visualise import load_model
    out = work['root'] / 'exp_pre'
    code, stdout, err = in_process(main, '--checkpoint', work['pre'], '--output', out, capsys=capsys)
    assert code == 0, err
    st, ox = out / 'fastconvmae_convvit_tiny_patch16.safetensors', out / 'fastconvmae_convvit_tiny_patch16.encoder.onnx'
    assert len(stdout.splitlines()) == 2 and st.exists() and ox.exists()
    mae = load_model(work['pre'])
    x, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.inference_mode():
        ref = mae(x, 0.75, noise)[1]
        assert torch.equal(load_weights(st)(x, 0.75, noise)[1], ref)
        assert torch.equal(timm.create_model(**timm_kwargs(st)).eval()(x, 0.75, noise)[1], ref)
        assert torch.equal(timm.create_model('fastconvmae_convvit_tiny_patch16', pretrained=True, img_size=64,
                                             pretrained_cfg_overlay=dict(file=str(st))).eval()(x, 0.75, noise)[1], ref)
    # the ONNX encoder gives the features a classifier fine-tuned from this checkpoint starts from
    from fastconvmae.models import create_model
    start = create_model('convvit_tiny_patch16', num_classes=5, img_size=64).eval()
    load_pretrained(start, work['pre'], verbose=False)
    with torch.inference_mode(): feats = start.forward_features(x)
    got = ort.InferenceSession(str(ox), providers=['CPUExecutionProvider']).run(None, {'image': x.numpy()})[0]
    assert got.shape == (2, 16, 192) and np.abs(got - feats.numpy()).max() < 1e-4


def test_export_user_mistakes_get_one_line(work, capsys):
    from fastconvmae.export import main
    for args, needles in [(['--checkpoint', work['root'] / 'missing.pth'], ['checkpoint not found']),
                          (['--checkpoint', work['named'], '--format', 'tflite'], ["--format 'tflite'"]),
                          (['--checkpoint', work['named'], '--img_size', '100'], ['--img_size must be a positive multiple of 16']),
                          (['--checkpoint', work['named'], '--output', DATA / 'chelsea.jpg'], ['exists and is not a folder']),
                          ([], ['the following arguments are required: --checkpoint'])]:
        code, out, err = in_process(main, *args, capsys=capsys)
        one_error_line(code, err, *needles, out=out)


def test_onnx_missing_is_one_line(work, capsys, monkeypatch):
    "without onnx installed: one line saying what to install, and nothing written"
    import builtins
    from fastconvmae.export import main
    real = builtins.__import__
    def no_onnx(name, *a, **k):
        if name.split('.')[0] in ('onnx', 'onnxruntime'): raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', no_onnx)
    out = work['root'] / 'no_onnx'
    code, stdout, err = in_process(main, '--checkpoint', work['named'], '--output', out, capsys=capsys)
    one_error_line(code, err, 'ONNX export needs onnx and onnxruntime: pip install', out=stdout)
    assert not out.exists()
