"""Non-finite losses recover by themselves (issue 20, point 2), tested the way a user meets it: the `fastconvmae`
command, with a NaN injected through the training engine's fault hook (`FASTCONVMAE_INJECT_NONFINITE`, a list of
training steps `epoch * iterations + iteration`) in pretraining and in fine-tuning. Each run must finish with finite
weights, count the skipped step in its log, give the same result on every repeat, and stop with one clear line only
when the fault never goes away. Also: `--resume` with a file of the wrong kind is one `error:` line."""
import csv, os, subprocess, sys
from pathlib import Path
import pytest, torch
from _checkpoints import make_toy

REPO = Path(__file__).resolve().parents[1]
FASTCONVMAE = str(Path(sys.executable).parent / 'fastconvmae')
PRE = ['pretrain', '--data', str(REPO / 'data'), '--img_size', '64', '--bs', '2', '--workers', '0', '--precision', 'fp32',
       '--blr', '5e-3', '--epochs', '2', '--warmup_epochs', '0']

def run(*args, inject=None, cwd=REPO, settings=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'CUDA_VISIBLE_DEVICES': ''}
    env.pop('FASTCONVMAE_INJECT_NONFINITE', None); env.pop('FASTCONVMAE_NONFINITE', None)
    if inject is not None: env['FASTCONVMAE_INJECT_NONFINITE'] = inject
    if settings is not None: env['FASTCONVMAE_NONFINITE'] = settings
    return subprocess.run([FASTCONVMAE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

def weights(p): return torch.load(p, map_location='cpu', weights_only=True)['model']
def rows(p): return list(csv.DictReader(open(p)))

def test_pretrain_skips_an_injected_nan_and_repeats_exactly(tmp_path):
    a, b, clean = tmp_path / 'a', tmp_path / 'b', tmp_path / 'clean'
    ra = run(*PRE, '--output', a, inject='1')
    assert ra.returncode == 0, ra.stderr[-2000:]
    assert 'warning: non-finite loss or gradients at epoch 0, iteration 1: step skipped' in ra.stderr
    log = rows(a / 'log.csv')
    assert [r['skipped_steps'] for r in log] == ['1', '0']                       # counted in the log, in its epoch
    assert all(float(r['train_loss']) == float(r['train_loss']) for r in log)    # no NaN in the log
    wa = weights(a / 'checkpoint-latest.pth')
    assert all(torch.isfinite(v).all() for v in wa.values() if v.is_floating_point())
    rb = run(*PRE, '--output', b, inject='1')                                     # the same on every repeat
    assert rb.returncode == 0, rb.stderr[-2000:]
    wb = weights(b / 'checkpoint-latest.pth')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rc = run(*PRE, '--output', clean)                                             # and the fault did change the run
    assert rc.returncode == 0 and [r['skipped_steps'] for r in rows(clean / 'log.csv')] == ['0', '0']
    wc = weights(clean / 'checkpoint-latest.pth')
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)

def test_pretrain_rolls_back_then_stops_when_the_fault_stays(tmp_path):
    r = run(*PRE, '--output', tmp_path / 'r', '--epochs', '3', inject='1,2,3')   # three in a row: a roll-back, then on
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'rolled back to the start of epoch' in r.stderr
    assert sum(int(x['skipped_steps']) for x in rows(tmp_path / 'r' / 'log.csv')) == 3
    r = run(*PRE, '--output', tmp_path / 's', '--epochs', '20', inject=','.join(map(str, range(1, 200))))
    assert r.returncode == 1, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and 'after 3 roll-backs: training stopped' in err[0] and 'Traceback' not in r.stderr

def test_the_number_of_roll_backs_is_the_users(tmp_path):
    "`FASTCONVMAE_NONFINITE=max_rollbacks=1`: a fault that stays stops the run after one roll-back (three by default); a bad setting is one line."
    r = run(*PRE, '--output', tmp_path / 's', '--epochs', '20', inject=','.join(map(str, range(1, 200))), settings='max_rollbacks=1')
    assert r.returncode == 1, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and 'after 1 roll-back: training stopped' in err[0], r.stderr[-2000:]
    assert r.stderr.count('rolled back to the start of epoch') == 1
    r = run(*PRE, '--output', tmp_path / 't', settings='rollbacks=2')
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith('error: FASTCONVMAE_NONFINITE:'), r.stderr[-2000:]

def test_finetune_skips_an_injected_nan(tmp_path):
    make_toy(tmp_path / 'data')
    ft = ['finetune', 'data', '--epochs', '2', '--warmup_epochs', '0.5', '--bs', '4', '--num_workers', '0', '--precision', 'fp32']
    r = run(*ft, '--output_dir', 'a', inject='1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'step skipped' in r.stderr
    assert [x['skipped_steps'] for x in rows(tmp_path / 'a' / 'history.csv')] == ['1', '0']
    sd = weights(tmp_path / 'a' / 'finetuned.pth')
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    r2 = run(*ft, '--output_dir', 'b', inject='1', cwd=tmp_path)
    assert r2.returncode == 0
    sd2 = weights(tmp_path / 'b' / 'finetuned.pth')
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)

@pytest.mark.parametrize('kind', ['garbage', 'weights'])
def test_resume_with_the_wrong_kind_of_file_is_one_line(tmp_path, kind):
    f = tmp_path / 'x.pth'
    if kind == 'garbage': f.write_bytes(b'\x80not a checkpoint at all')
    else: torch.save({'model': {'w': torch.zeros(2)}}, f)                        # weights, not a training run
    r = run(*PRE, '--resume', f, '--output', tmp_path / 'o')
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), r.stderr[-2000:]
    assert ('not a readable checkpoint' if kind == 'garbage' else 'is not a checkpoint-latest.pth of a training run') in lines[0]
