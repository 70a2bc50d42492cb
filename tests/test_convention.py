"""One command-line convention for every subcommand (issue 20, point 5): positional DATA, `--output`, `--model` with
size aliases, `--pretrained` for the weights a run starts from, `--checkpoint` only for the trained model that is used,
`--workers`; one parser per mode of `detect` and `segment`; the names used before still accepted."""
import os, subprocess, sys
from pathlib import Path
import pytest
from PIL import Image
from fastconvmae.cli import exact_parser, parse_command
from fastconvmae import command, finetune, linprobe, knn, detection, segmentation, demo, predict, export, visualise

BIN = Path(sys.executable).parent
needs_scripts = pytest.mark.skipif(not (BIN / 'fastconvmae').exists(), reason='console scripts not installed (pip install -e .)')

def run(*args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run([str(BIN / 'fastconvmae'), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

# (subcommand, mode, function, what the run starts from or uses, its positional)
PARSERS = [('pretrain', None, command.pretrain_main, None, 'DATA'), ('finetune', None, finetune.main, 'pretrained', 'DATA'),
           ('linprobe', None, linprobe.main, 'pretrained', 'DATA'), ('knn', None, knn.main, 'checkpoint', 'DATA'),
           ('detect', 'train', detection.main, 'pretrained', 'DATA'), ('detect', 'evaluate', detection.main, 'checkpoint', 'DATA'),
           ('detect', 'predict', detection.main, 'checkpoint', 'IMAGES'), ('segment', 'train', segmentation.main, 'pretrained', 'DATA'),
           ('segment', 'evaluate', segmentation.main, 'checkpoint', 'DATA'), ('segment', 'predict', segmentation.main, 'checkpoint', 'DATA'),
           ('predict', None, predict.main, 'checkpoint', 'IMAGES'), ('export', None, export.main, 'checkpoint', None),
           ('reconstruct', None, visualise.main, 'checkpoint', 'IMAGES'), ('demo', None, demo.demo, None, 'DATA')]

def helptext(sub, mode, fn): return exact_parser(fn, f"fastconvmae {sub}" + (f" {mode}" if mode else ''), mode).format_help()

@pytest.mark.parametrize('sub,mode,fn,weights,pos', PARSERS, ids=[f"{p[0]}-{p[1]}" if p[1] else p[0] for p in PARSERS])
def test_one_convention(sub, mode, fn, weights, pos):
    h = helptext(sub, mode, fn)
    for old in ('--output_dir', '--num_workers', '--arch', '--data ', '--images '): assert old not in h, (old, h)
    if pos: assert pos in h.split('\n\n')[0], h   # in the usage line
    if weights == 'pretrained': assert '--pretrained' in h and '--checkpoint' not in h, h
    if weights == 'checkpoint': assert '--checkpoint' in h and '--pretrained' not in h, h
    opts = set(exact_parser(fn, 'x', mode)._option_string_actions)
    if 'train' in (mode or sub) or sub in ('pretrain', 'finetune', 'linprobe'):
        for o in ('--output', '--workers', '--model', '--resume', '--precision', '--device', '--seed', '--overwrite', '--debug'):
            assert o in opts, (o, sorted(opts))

def test_modes_have_their_own_options():
    "`detect train --help` shows training options only, `detect predict --help` the predictor's."
    tr, pr = helptext('detect', 'train', detection.main), helptext('detect', 'predict', detection.main)
    assert '--epochs' in tr and '--epochs' not in pr and '--score_thresh' in pr and '--score_thresh' not in tr
    ev = helptext('segment', 'evaluate', segmentation.main)
    assert '--iters' not in ev and '--split' in ev and '--iters' in helptext('segment', 'train', segmentation.main)

@pytest.mark.parametrize('fn,argv,expect', [
    (finetune.main, ['d', '--output_dir', 'o', '--num_workers', '2', '--checkpoint', 'w.pth'], dict(output='o', workers=2, pretrained='w.pth')),
    (linprobe.main, ['d', '--checkpoint', 'w.pth', '--output_dir', 'o'], dict(pretrained='w.pth', output='o')),
    (command.pretrain_main, ['--data', 'd', '--arch', 'tiny'], dict(data='d', model='tiny')),
    (demo.demo, ['--data', 'd'], dict(data='d')),
])
def test_old_names_still_parse(fn, argv, expect):
    "The commands saved in the chapters' outputs keep working: old names parse to the new ones."
    a = parse_command(fn, argv, 'x')
    assert {k: a[k] for k in expect} == expect

def test_old_mode_names_still_parse():
    a = parse_command(detection.main, ['train', '--data', 'd', '--arch', 'small'], 'x')
    assert (a['mode'], a['data'], a['model']) == ('train', 'd', 'small')
    a = parse_command(detection.main, ['predict', '--images', 'i', '--checkpoint', 'c'], 'x')
    assert (a['images'], a['checkpoint']) == ('i', 'c')
    a = parse_command(segmentation.main, ['train', 'd', '--checkpoint', 'w.pth'], 'x')   # segment train's start weights were --checkpoint
    assert a['pretrained'] == 'w.pth' and 'checkpoint' not in a   # a mode's parse holds its own options only
    a = parse_command(segmentation.main, ['evaluate', 'd', '--checkpoint', 's.pth'], 'x')
    assert a['checkpoint'] == 's.pth' and 'pretrained' not in a

@needs_scripts
@pytest.mark.parametrize('model,preset,arch', [('tiny', 'cpu', 'fastconvmae_convvit_tiny_patch16'),
                                              ('small', 'convmae_base', 'convmae_convvit_small_patch16'),
                                              ('convmae_convvit_tiny_patch16', 'cpu', 'convmae_convvit_tiny_patch16')])
def test_pretrain_model_alias_through_the_command(model, preset, arch, tmp_path):
    "`fastconvmae pretrain DATA --model tiny --dry_run`: the size alias becomes the preset's method at that size, and the data is checked."
    (tmp_path / 'imgs').mkdir()
    for i in range(3): Image.new('RGB', (40, 40), (i * 60, 90, 30)).save(tmp_path / 'imgs' / f'{i}.jpg')
    r = run('pretrain', 'imgs', '--model', model, '--preset', preset, '--dry_run', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"'arch': '{arch}'" in r.stdout and 'data: 3 images in imgs' in r.stdout, r.stdout

@needs_scripts
@pytest.mark.parametrize('args', [['pretrain', 'nowhere', '--dry_run'], ['pretrain', 'nowhere'], ['finetune', 'nowhere'],
                                  ['linprobe', 'nowhere', '--quick'], ['knn', 'nowhere'], ['detect', 'train', 'nowhere'],
                                  ['segment', 'train', 'nowhere'], ['demo', 'nowhere']], ids=lambda a: '-'.join(a[:2]))
def test_missing_data_is_a_user_mistake_everywhere(args, tmp_path):
    "A data folder that does not exist: exit 2 and one `error:` line, in every subcommand (it was 1 in some), and nothing written."
    r = run(*args, cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and 'nowhere' in lines[0], (r.returncode, r.stderr[-2000:])
    assert not list(tmp_path.iterdir())

@needs_scripts
def test_detect_mode_help_through_the_command(tmp_path):
    r = run('detect', 'predict', '--help', cwd=tmp_path)
    assert r.returncode == 0 and 'usage: fastconvmae detect predict' in r.stdout and '--epochs' not in r.stdout
    r = run('detect', cwd=tmp_path)
    assert r.returncode == 2 and 'train' in r.stdout and 'evaluate' in r.stdout
    r = run('detect', 'trian', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown mode 'trian' (did you mean train?)")

def _has(mod):
    import importlib.util
    return importlib.util.find_spec(mod) is not None

@needs_scripts
@pytest.mark.skipif(_has('tensorboard'), reason='tensorboard is installed: this checks the message without it')
@pytest.mark.parametrize('args', [['finetune', 'nowhere'], ['linprobe', 'nowhere'], ['detect', 'train', 'nowhere'],
                                  ['segment', 'train', 'nowhere'], ['pretrain', 'nowhere']], ids=lambda a: '-'.join(a[:2]))
def test_tensorboard_reaches_every_training_command(args, tmp_path):
    "`--tensorboard` is an option of every training command and goes to the engine's `extra_loggers`: without the package, one line says what to install, before anything is read or written."
    (tmp_path / 'nowhere').mkdir()
    r = run(*args, '--tensorboard', cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1 and '--tensorboard needs `pip install tensorboard`' in lines[0], r.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ['nowhere'] and not list((tmp_path / 'nowhere').iterdir())

@needs_scripts
def test_finetune_in_the_new_convention_and_ctrl_c(tmp_path):
    "`fastconvmae finetune DATA --output O --workers 0 --model tiny` trains; Ctrl-C ends it with exit 130 and one line naming the last checkpoint (the engine's, as in pretraining)."
    import signal, time
    sys.path.insert(0, str(Path(__file__).parent)); from _checkpoints import make_toy
    make_toy(tmp_path / 'data')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.Popen([str(BIN / 'fastconvmae'), 'finetune', 'data', '--model', 'tiny', '--img_size', '64', '--epochs', '200',
                             '--warmup_epochs', '0.5', '--bs', '4', '--workers', '0', '--precision', 'fp32', '--output', 'runs/ft'],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ck, t0 = tmp_path / 'runs' / 'ft' / 'checkpoint-latest.pth', time.time()
    while not ck.exists() and time.time() - t0 < 600 and proc.poll() is None: time.sleep(0.05)
    if not ck.exists(): proc.kill(); pytest.fail(f'no checkpoint within 600 s: {proc.communicate()[1][-2000:]}')
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f'interrupted; last checkpoint: {ck}' in err and 'Traceback' not in err, err[-2000:]
    from fastconvmae.checkpoint import load_checkpoint
    c = load_checkpoint(ck)['config']
    assert (c['model'], c['num_workers'], c['img_size']) == ('convvit_tiny_patch16', 0, 64)   # --model tiny is the registry's name

@needs_scripts
def test_fewer_images_than_a_batch_is_a_user_mistake(tmp_path):
    "Pretraining 3 images with --bs 8: exit 2 and one line naming --bs (it was exit 1)."
    (tmp_path / 'imgs').mkdir()
    for i in range(3): Image.new('RGB', (40, 40), (i * 60, 90, 30)).save(tmp_path / 'imgs' / f'{i}.jpg')
    r = run('pretrain', 'imgs', '--bs', '8', '--workers', '0', cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert r.returncode == 2 and len(lines) == 1 and 'fewer than one batch of 8 (--bs)' in lines[0], r.stderr[-2000:]
    assert not (tmp_path / 'runs').exists()
