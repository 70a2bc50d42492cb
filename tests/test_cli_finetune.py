"""The fine-tuning and linear-probing command lines as a user meets them: the installed console scripts, run with
`subprocess` on a tiny ImageNet-layout folder (8 training, 4 validation copies of the bundled photos, 2 classes) with
ConvViT-T at 64 px, so that each run takes seconds. Issue 8 ("Trust"), points 1-6, 11, 12, 14, 21, 22."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from _checkpoints import make_toy

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / 'data'
BIN = Path(sys.executable).parent
FAST = ['--epochs', '2', '--warmup_epochs', '0.5', '--bs', '4', '--num_workers', '0', '--precision', 'fp32']

pytestmark = pytest.mark.skipif(not (BIN / 'fastconvmae_finetune').exists(),
                                reason='console scripts not installed (pip install -e .)')


def cli(name, *args, cwd):
    "Run console script `name` with `args` in `cwd`, output to pipes (not a terminal)"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    return subprocess.run([str(BIN / name), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def one_error_line(r, *needles):
    "A user mistake: exit status 2 and exactly one line `error: ...` holding every needle, no traceback"
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-3000:]
    assert 'Traceback' not in r.stderr + r.stdout
    for n in needles: assert n in lines[0], lines[0]
    return lines[0]


def last_json(r) -> dict:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def files_under(p: Path) -> list:
    return sorted(str(f.relative_to(p)) for f in p.rglob('*'))


# ---------------------------------------------------------------- points 1, 2, 3, 21, 22: a run, a re-run, --overwrite, --resume
def test_finetune_cli_exit_status_output_folder_and_runs_never_lost(tmp_path):
    make_toy(tmp_path / 'data')
    before = files_under(tmp_path / 'data')
    r = cli('fastconvmae_finetune', 'data', *FAST, '--output_dir', 'runs/ft', cwd=tmp_path)
    res = last_json(r)                                               # exit 0, the JSON line last (was: exit 1, a Learner)
    assert set(res) == {'top1', 'top5', 'valid_unreadable', 'wall_time_s'} and res['valid_unreadable'] == 0
    out = tmp_path / 'runs' / 'ft'                                   # relative to the working directory, not to data/
    assert sorted(os.listdir(out)) == ['checkpoint-latest.pth', 'finetuned.pth', 'history.csv']
    assert files_under(tmp_path / 'data') == before                  # nothing written into the dataset
    assert '\r' not in r.stdout and '<fastai.learner.Learner' not in r.stdout
    assert [l.split()[:2] for l in r.stdout.splitlines() if l.startswith('epoch ')] == [['epoch', '0'], ['epoch', '1']]
    ck = out / 'checkpoint-latest.pth'
    stamp, saved = ck.stat().st_mtime_ns, torch.load(ck, weights_only=True)['model']

    # the same command again: refused, the trained checkpoint untouched
    r = cli('fastconvmae_finetune', 'data', *FAST, '--output_dir', 'runs/ft', cwd=tmp_path)
    one_error_line(r, 'already holds a run', '--resume', '--overwrite')
    assert ck.stat().st_mtime_ns == stamp

    # --resume continues the run in its folder: one header and one row per epoch in history.csv
    r = cli('fastconvmae_finetune', 'data', *FAST[2:], '--epochs', '3', '--resume', 'runs/ft/checkpoint-latest.pth', cwd=tmp_path)
    last_json(r)
    rows = (out / 'history.csv').read_text().splitlines()
    assert rows[0].startswith('epoch,') and [l.split(',')[0] for l in rows[1:]] == ['0', '1', '2'], rows
    after = torch.load(ck, weights_only=True)
    assert after['epoch'] == 2 and not torch.equal(after['model']['head.weight'], saved['head.weight'])


def test_linprobe_cli_exit_status_and_output_folder(tmp_path, monkeypatch):
    make_toy(tmp_path / 'data')
    r = cli('fastconvmae_linprobe', 'data', *FAST, '--epochs', '1', '--output_dir', 'lp', cwd=tmp_path)
    assert set(last_json(r)) == {'top1', 'top5', 'valid_unreadable', 'wall_time_s'}
    assert sorted(os.listdir(tmp_path / 'lp')) == ['checkpoint-latest.pth', 'history.csv', 'linprobe.pth']
    from fastconvmae.linprobe import linprobe
    from fastconvmae.pretrain import UserError
    monkeypatch.chdir(tmp_path)   # the function, like the command line, resolves a relative folder against the working directory
    with pytest.raises(UserError, match='already holds a run'): linprobe('data', 'cpu', output_dir='lp', bs=4)
    linprobe('data', 'cpu', output_dir='lp', overwrite=True, bs=4, epochs=1, warmup_epochs=0.5, num_workers=0, precision='fp32',
             verbose=False)
    assert len((tmp_path / 'lp' / 'history.csv').read_text().splitlines()) == 2


# ---------------------------------------------------------------- point 4: every numeric option, checked before anything loads
@pytest.mark.parametrize('name, args, needle', [
    ('fastconvmae_finetune', ['--accum', '0'], '--accum must be a positive integer'),
    ('fastconvmae_linprobe', ['--epochs', '-1'], '--epochs must be a positive integer'),
])
def test_cli_rejects_bad_numbers_in_one_line(tmp_path, name, args, needle):
    one_error_line(cli(name, tmp_path / 'not-even-there', *args, '--output_dir', 'out', cwd=tmp_path), needle)
    assert not (tmp_path / 'out').exists()   # refused before any folder is made


@pytest.mark.parametrize('override, needle', [
    (dict(accum=0), '--accum must be a positive integer'), (dict(epochs=0), '--epochs must be a positive integer'),
    (dict(epochs=-1), '--epochs must be a positive integer'), (dict(bs=0), '--bs must be a positive integer'),
    (dict(img_size=0), '--img_size must be'), (dict(img_size=-32), '--img_size must be'), (dict(img_size=72), '--img_size must be'),
    (dict(lr=-1e-3), '--lr must be a positive'), (dict(blr=0.), '--blr must be a positive'), (dict(min_lr=-1.), '--min_lr'),
    (dict(mixup_prob=1.5), '--mixup_prob must be a number in [0, 1]'), (dict(mixup_prob=-0.1), '--mixup_prob'),
    (dict(reprob=2.), '--reprob'), (dict(mixup=-1.), '--mixup must be'), (dict(cutmix=-1.), '--cutmix must be'),
    (dict(smoothing=1.), '--smoothing must be below 1'), (dict(layer_decay=0.), '--layer_decay'), (dict(layer_decay=1.5), '--layer_decay'),
    (dict(drop_path=1.), '--drop_path must be below 1'), (dict(weight_decay=-0.1), '--weight_decay'),
    (dict(warmup_epochs=-1.), '--warmup_epochs'), (dict(warmup_epochs=9.), 'must not exceed --epochs'),
    (dict(num_workers=-1), '--num_workers'), (dict(bs=3), '--bs must be even'), (dict(precision='fp8'), '--precision'),
    (dict(model='fastconvmae_convvit_tiny_patch16'), 'not a classifier'), (dict(aa='bogus'), '--aa'),
])
def test_finetune_settings_checked(override, needle):
    from fastconvmae.finetune import finetune
    from fastconvmae.pretrain import UserError
    with pytest.raises(UserError) as e: finetune('/nonexistent', 'cpu', **override)
    assert needle in str(e.value) and '\n' not in str(e.value)


def test_linprobe_settings_checked():
    from fastconvmae.linprobe import linprobe
    from fastconvmae.pretrain import UserError
    for override, needle in [(dict(bs=0), '--bs'), (dict(img_size=-32), '--img_size'), (dict(blr=-1.), '--blr'),
                             (dict(weight_decay=-1.), '--weight_decay'), (dict(epochs=0), '--epochs')]:
        with pytest.raises(UserError, match=needle): linprobe('/nonexistent', 'cpu', **override)
    with pytest.raises(UserError, match='--seed'): linprobe('/nonexistent', 'cpu', seed=-1)


# ---------------------------------------------------------------- point 14: unsafe and broken checkpoints, one line each
class SystemPayload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_cli_bad_checkpoints_one_line_each(tmp_path):
    make_toy(tmp_path / 'data')
    torch.save({'model': {'w': torch.zeros(2)}, 'x': SystemPayload(tmp_path / 'PAYLOAD_RAN')}, tmp_path / 'evil.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'random.pth').write_bytes(np.random.default_rng(0).bytes(4096))
    one_error_line(cli('fastconvmae_finetune', 'data', *FAST, '--checkpoint', 'evil.pth', cwd=tmp_path),
                   "refused", "'posix.system' (os.system)", '--trusted')
    assert not (tmp_path / 'PAYLOAD_RAN').exists()
    one_error_line(cli('fastconvmae_linprobe', 'data', '--quick', '--checkpoint', 'empty.pth', cwd=tmp_path), 'empty.pth is empty')
    r = cli('fastconvmae_finetune', 'data', *FAST, '--checkpoint', 'random.pth', '--debug', cwd=tmp_path)
    assert r.returncode != 0 and 'Traceback' in r.stderr and 'BadCheckpointError: random.pth is not a PyTorch checkpoint' in r.stderr


# ---------------------------------------------------------------- points 5, 6: a symlink loop, an unreadable validation image
def test_cli_symlink_loop_and_unreadable_validation_image(tmp_path):
    make_toy(tmp_path / 'data')
    (tmp_path / 'data' / 'train' / 'class0' / 'loop').symlink_to(tmp_path / 'data' / 'train')
    bad = tmp_path / 'data' / 'val' / 'class1' / 'img1.jpg'
    bad.write_bytes(bad.read_bytes()[:1500])
    r = cli('fastconvmae_finetune', 'data', *FAST, '--epochs', '1', '--output_dir', 'ft', cwd=tmp_path)
    res = last_json(r)
    assert '8 train / 4 val images' in r.stdout                       # the loop did not multiply the training set
    assert res['valid_unreadable'] == 1 and 'left out of the metrics (top-1/top-5 over the 3 readable ones)' in r.stdout
    saved = torch.load(tmp_path / 'ft' / 'finetuned.pth', weights_only=True)['results']
    assert (saved['valid_scored'], saved['valid_unreadable']) == (3, 1)
    q = last_json(cli('fastconvmae_linprobe', 'data', '--quick', '--bs', '4', cwd=tmp_path))
    assert (q['n_train'], q['n_valid'], q['valid_unreadable']) == (8, 3, 1)


# ---------------------------------------------------------------- points 11, 12: EasyCV and MoR checkpoints through the CLI
@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
    "A real MoR pretraining checkpoint of ConvViT-T (pixel + EMA, one epoch on the bundled photos) and an EasyCV-layout one"
    from fastconvmae.models import CONVVIT_ARCHS
    from _checkpoints import mor_checkpoint, as_easycv_pretraining
    out = tmp_path_factory.mktemp('ckpts')
    mor = mor_checkpoint(out / 'mor', **CONVVIT_ARCHS['tiny'])
    sd = {k: v for k, v in torch.load(mor, weights_only=True)['model'].items() if not k.startswith(('teachers.', 'decoder_branches.'))}
    torch.save(as_easycv_pretraining(sd), out / 'easycv.pth')   # EasyCV's MAE: encoder. + FastConvMAEViT, decoder. + the neck
    return mor, out / 'easycv.pth', sd


def test_cli_mor_checkpoint_student_and_ema(tmp_path, tiny_checkpoints):
    mor, _, student = tiny_checkpoints
    make_toy(tmp_path / 'data')
    r = cli('fastconvmae_finetune', 'data', *FAST, '--epochs', '1', '--checkpoint', mor, '--from_ema', '--output_dir', 'ft',
            cwd=tmp_path)
    last_json(r)
    assert '(MoR, ' in r.stdout
    assert 'MoR student encoder (from_ema=True: the EMA teacher is loaded)' in r.stdout and 'MoR decoder branches' in r.stdout


def test_cli_easycv_pretraining_checkpoint(tmp_path, tiny_checkpoints):
    _, easy, _ = tiny_checkpoints
    make_toy(tmp_path / 'data')
    r = cli('fastconvmae_linprobe', 'data', '--quick', '--bs', '4', '--checkpoint', easy, cwd=tmp_path)
    last_json(r)
    assert '(EasyCV pretraining, ' in r.stdout and 'EasyCV decoder' in r.stdout


# ---------------------------------------------------------------- a real kill, then --resume: the same weights as without the kill
def test_cli_killed_then_resumed_equals_uninterrupted(tmp_path):
    import signal, time
    root = make_toy(tmp_path / 'data')
    for f in sorted((root / 'train').rglob('*.jpg')):       # 32 training images: 8 steps per epoch, time to kill mid-run
        for k in range(3): shutil.copy(f, f.with_name(f'{f.stem}_{k}.jpg'))
    args = ['data', '--epochs', '4', '--warmup_epochs', '1', '--bs', '4', '--num_workers', '0', '--precision', 'fp32']
    last_json(cli('fastconvmae_finetune', *args, '--output_dir', 'full', cwd=tmp_path))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    p = subprocess.Popen([str(BIN / 'fastconvmae_finetune'), *args, '--output_dir', 'half'], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck, t0 = tmp_path / 'half' / 'checkpoint-latest.pth', time.time()
    while p.poll() is None and time.time() - t0 < 600:
        if ck.exists():
            p.send_signal(signal.SIGSTOP)  # frozen while we look: a slow poll under load cannot miss the window
            if torch.load(ck, weights_only=True)['epoch'] < 3: break
            p.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    if not ck.exists(): p.kill(); pytest.fail('no checkpoint within 600 s')
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    assert not (tmp_path / 'half' / 'finetuned.pth').exists()
    killed_at = torch.load(ck, weights_only=True)['epoch']
    assert killed_at < 3
    r = cli('fastconvmae_finetune', *args, '--resume', 'half/checkpoint-latest.pth', cwd=tmp_path)
    last_json(r)
    assert f'resuming at epoch {killed_at + 1}' in r.stdout
    a = torch.load(tmp_path / 'full' / 'finetuned.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'half' / 'finetuned.pth', weights_only=True)['model']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / 'half' / 'history.csv').read_text().splitlines()
    assert [l.split(',')[0] for l in rows] == ['epoch', '0', '1', '2', '3']
