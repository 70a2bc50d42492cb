"""`fastconvmae_pretrain` as a user meets it: through the console script, with kills, bad options and reruns.

Each test runs the installed command in a subprocess on the five bundled photos (tiny Fast ConvMAE, 64 px), so what is
checked is what a user sees: exit status, the one-line error, the files left behind, and bit-exact resume after SIGKILL."""
import os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

REPO = Path(__file__).resolve().parents[1]
CMD = str(Path(sys.executable).with_name('fastconvmae_pretrain'))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
QUICK = ['--data', str(REPO / 'data'), '--img_size', '64', '--bs', '5', '--workers', '0', '--precision', 'auto', '--blr', '5e-3']

def run(*args, timeout=600, env=None):
    return subprocess.run([CMD, *map(str, args)], capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=REPO, timeout=timeout)

def load(p): return torch.load(p, map_location='cpu', weights_only=True)

def one_error_line(p):
    "A user mistake: non-zero exit, one `error: ...` line on stderr, no traceback, no start-up warning."
    assert p.returncode != 0, p.stdout[-1000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), p.stderr[-2000:]
    assert 'Traceback' not in p.stderr and 'FutureWarning' not in p.stderr
    return lines[0]

@pytest.mark.parametrize('args, says', [
    (['--epochs', '0'], '--epochs must be a positive integer'), (['--epochs', '-1'], '--epochs must be a positive integer'),
    (['--bs', '0'], '--bs must be a positive integer'), (['--img_size', '0'], '--img_size must be a positive multiple of 16'),
    (['--img_size', '-32'], '--img_size must be'), (['--accum', '0'], '--accum must be a positive integer'),
    (['--mask_ratio', '1.5'], '--mask_ratio must be'), (['--blr', 'nan'], '--blr must be a positive number'),
    (['--arch', 'convvit_tiny_patch16'], 'cannot be pretrained'), (['--preset', 'huge'], 'unknown preset'),
    (['--targets', 'pixel,sift'], 'unknown targets'), (['--precision', 'fp8'], '--precision must be'),
    (['--data', '/nonexistent/folder'], 'not found'), (['--bs', '1', '--accum', '6'], '--accum 6 is more than the 5 batches of an epoch'),
])
def test_bad_options_get_one_line(tmp_path, args, says):
    line = one_error_line(run(*QUICK, '--output', tmp_path / 'run', '--epochs', '1', *args))
    assert says in line, line
    assert not (tmp_path / 'run' / 'checkpoint-latest.pth').exists()

def test_published_batch_kept_by_accumulation():
    p = run('--preset', 'fastconvmae_base', '--dry_run')
    assert p.returncode == 0 and "'accum': 8" in p.stdout and 'accumulated over 8 steps' in p.stdout, p.stdout + p.stderr
    p = run('--preset', 'fastconvmae_base', '--bs', '32', '--dry_run')  # the user's batch wins
    assert p.returncode == 0 and "'accum': 1" in p.stdout

def test_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / 'run'
    p = run(*QUICK, '--epochs', '2', '--output', out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '\r' not in p.stdout and len(re.findall(r'^epoch \d', p.stdout, re.M)) == 2  # a pipe gets one line per epoch
    assert 'FutureWarning' not in p.stderr
    from fastconvmae.training import cpu_has_bf16_units
    want = 'bf16' if cpu_has_bf16_units() else 'fp32'                        # --precision auto: what this CPU runs natively
    assert f'; {want} on cpu' in p.stdout and load(out / 'checkpoint-latest.pth')['recipe']['precision'] == want, p.stdout
    before = (out / 'checkpoint-latest.pth').read_bytes()
    line = one_error_line(run(*QUICK, '--epochs', '2', '--output', out))
    assert '--resume' in line and '--overwrite' in line
    assert (out / 'checkpoint-latest.pth').read_bytes() == before  # the trained checkpoint is untouched
    p = run(*QUICK, '--epochs', '1', '--output', out, '--overwrite')
    assert p.returncode == 0, p.stderr[-2000:]
    assert load(out / 'checkpoint-latest.pth')['epoch'] == 0
    assert len((out / 'log.csv').read_text().splitlines()) == 2  # header + the new run's one epoch

def test_sigkill_then_resume_is_exact(tmp_path):
    """Killed after a checkpoint and resumed, the run ends bit-identical to an uninterrupted one, with a clean log.
Five batches an epoch accumulated by four: the fifth is dropped each epoch (as MAE's engine does), so no count is lost."""
    args = [*QUICK, '--bs', '1', '--accum', '4', '--epochs', '6', '--warmup_epochs', '1', '--seed', '3']
    a, b = tmp_path / 'straight', tmp_path / 'killed'
    assert run(*args, '--output', a).returncode == 0
    proc = subprocess.Popen([CMD, *map(str, args), '--output', str(b)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, cwd=REPO)
    ck, t0 = b / 'checkpoint-latest.pth', time.time()
    while time.time() - t0 < 600:
        if ck.exists():
            proc.send_signal(signal.SIGSTOP)  # frozen while we look: a slow poll under load cannot miss the window
            if load(ck)['epoch'] >= 1: break
            proc.send_signal(signal.SIGCONT)
        if proc.poll() is not None: pytest.fail('the run ended before it could be killed')
        time.sleep(0.05)
    else: proc.kill(); pytest.fail('no checkpoint of epoch >= 1 within 600 s')
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = load(ck)['epoch']
    assert killed_at < 5, 'killed too late to test resume'
    (b / '.checkpoint-latest.pth.tmp-999999999').write_bytes(b'half a checkpoint')  # what a kill during a save leaves
    p = run(*args, '--resume', ck)  # resumes into the checkpoint's own folder
    assert p.returncode == 0, p.stderr[-2000:]
    assert not list(b.glob('.*.tmp-*'))  # the stale temporary file was cleaned up
    sa, sb = load(a / 'checkpoint-latest.pth'), load(ck)
    assert sb['epoch'] == 5
    for k in sa['model']: assert torch.equal(sa['model'][k], sb['model'][k]), k
    la, lb = [(a / 'log.csv').read_text().splitlines(), (b / 'log.csv').read_text().splitlines()]
    drop_time = lambda rows: [r.rsplit(',', 1)[0] for r in rows]
    assert lb[0] == la[0] and sum(l.startswith('epoch') for l in lb) == 1
    assert drop_time(lb) == drop_time(la)  # one row per epoch, same losses (the smoothed loss continues)

def test_resume_checks_the_method(tmp_path):
    out = tmp_path / 'run'
    assert run(*QUICK, '--epochs', '2', '--output', out).returncode == 0
    ck = out / 'checkpoint-latest.pth'
    line = one_error_line(run(*QUICK, '--epochs', '3', '--arch', 'convmae_convvit_tiny_patch16', '--resume', ck))
    assert 'Fast ConvMAE' in line and 'ConvMAE (convmae_convvit_tiny_patch16' in line and '--force_resume' in line
    line = one_error_line(run(*QUICK, '--epochs', '3', '--arch', 'fastconvmae_convvit_small_patch16', '--resume', ck, '--force_resume'))
    assert 'does not fit the model' in line
    line = one_error_line(run(*QUICK, '--epochs', '2', '--resume', ck))
    assert 'already finished epoch 2 of 2' in line

def test_bad_checkpoints_get_one_line(tmp_path):
    out = tmp_path / 'run'; out.mkdir()
    (out / 'checkpoint-latest.pth').write_bytes(b'')
    assert 'empty' in one_error_line(run(*QUICK, '--epochs', '2', '--resume', out / 'checkpoint-latest.pth'))
    (out / 'checkpoint-latest.pth').write_bytes(os.urandom(4096))
    line = one_error_line(run(*QUICK, '--epochs', '2', '--resume', out / 'checkpoint-latest.pth'))
    assert ('is not a PyTorch checkpoint' in line or 'is not a readable checkpoint' in line) and 'weights_only=False' not in line

def test_ctrl_c_names_the_last_checkpoint(tmp_path):
    out = tmp_path / 'run'
    # SIG_DFL first: a test suite started as a background job inherits an ignored SIGINT, which Python would keep
    proc = subprocess.Popen([CMD, *QUICK, '--epochs', '200', '--output', str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ck, t0 = out / 'checkpoint-latest.pth', time.time()
    while not ck.exists() and time.time() - t0 < 600 and proc.poll() is None: time.sleep(0.05)
    if not ck.exists(): proc.kill(); pytest.fail('no checkpoint within 600 s')
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f'interrupted; last checkpoint: {ck}' in err and 'Traceback' not in err
    load(ck)  # still a whole checkpoint

def test_knn_columns_in_the_log(tmp_path):
    "`--knn_every 1` logs the weighted k-NN accuracy of the encoder (knn chapter) on a labelled folder, every epoch."
    import shutil
    photos = sorted((REPO / 'data').glob('*.jpg'))
    for split, n in (('train', 3), ('val', 2)):
        for c, group in (('a', photos[:3]), ('b', photos[2:])):
            d = tmp_path / 'data' / split / c; d.mkdir(parents=True)
            for i, p in enumerate(group[:n]): shutil.copy(p, d / f'{i}_{p.name}')
    p = run('--data', tmp_path / 'data', '--img_size', '64', '--bs', '6', '--workers', '0', '--epochs', '2',
            '--knn_every', '1', '--output', tmp_path / 'run')
    assert p.returncode == 0, p.stderr[-2000:]
    rows = (tmp_path / 'run' / 'log.csv').read_text().splitlines()
    assert rows[0].split(',')[3:5] == ['knn_top1', 'knn_top5'] and len(rows) == 3
    assert all(0 <= float(r.split(',')[3]) <= 1 for r in rows[1:])

def test_compile_and_fast_decode_train_the_same_model(tmp_path):
    "`--compile` (torch.compile in place) and `--fast_decode` (no effect on small photos) run, exit 0 and save eager parameter names."
    p = run(*QUICK, '--epochs', '1', '--output', tmp_path / 'eager', '--precision', 'fp32')
    # a fresh inductor cache: a run killed while compiling can leave a truncated `.so` in the shared one (/tmp/torchinductor_$USER)
    q = run(*QUICK, '--epochs', '1', '--output', tmp_path / 'compiled', '--precision', 'fp32', '--compile', '--fast_decode',
            timeout=1200, env={'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor')})
    assert p.returncode == 0 and q.returncode == 0, q.stderr[-3000:]
    a, b = (load(tmp_path / d / 'checkpoint-latest.pth')['model'] for d in ('eager', 'compiled'))
    assert a.keys() == b.keys()  # no `_orig_mod.` prefixes: a compiled run's checkpoint loads anywhere
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3  # same data, same start, same model
