"""What a user's command line may and may not do, through the installed console scripts (issue 19):
no command deletes or replaces what it did not write in this run unless `--overwrite`; inputs are checked before the
output folder is touched; options are whole names, and an option of another mode is an error naming the right one;
every training command keeps what it trained; `make bench` runs the benchmark with flags it has."""
import os, shlex, subprocess, sys
from pathlib import Path
import pytest
from _checkpoints import make_toy

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = ['fastconvmae_pretrain', 'fastconvmae_finetune', 'fastconvmae_linprobe', 'fastconvmae_knn', 'fastconvmae_detect',
           'fastconvmae_segment', 'fastconvmae_demo']

pytestmark = pytest.mark.skipif(not (BIN / 'fastconvmae_demo').exists(), reason='console scripts not installed (pip install -e .)')

def cli(name, *args, cwd, timeout=600):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': '', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run([str(BIN / name), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

def one_error_line(r, *needles) -> str:
    "A user mistake: a non-zero exit and exactly one line `error: ...` holding every needle, no traceback."
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in r.stderr + r.stdout, r.stderr[-3000:]
    for n in needles: assert n in lines[0], lines[0]
    return lines[0]

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}

# ---------------------------------------------------------------- the demo
def test_demo_typo_keeps_the_previous_demo(tmp_path):
    "A bad --data is refused before the demo's folder is touched: the finished demo there is intact."
    out = tmp_path / 'demo_out'; out.mkdir()
    (out / 'checkpoint-latest.pth').write_bytes(b'a finished demo'); (out / 'log.csv').write_text('epoch,train_loss\n0,1.0\n')
    before = snapshot(out)
    one_error_line(cli('fastconvmae_demo', '--data', '/nonexistent', '--output', out, cwd=tmp_path, timeout=120),
                   'dataset folder not found: /nonexistent')
    assert snapshot(out) == before

def test_demo_never_replaces_an_earlier_demo(tmp_path):
    "Without --output a second demo goes to outputs/demo-2; an --output holding a demo is refused unless --overwrite."
    r = cli('fastconvmae_demo', '--epochs', '1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = tmp_path / 'outputs' / 'demo'
    assert {'checkpoint-latest.pth', 'log.csv', 'reconstruction.png'} <= set(snapshot(first))
    before = snapshot(first)
    r = cli('fastconvmae_demo', '--epochs', '1', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'outputs/demo-2' in r.stdout and (tmp_path / 'outputs' / 'demo-2' / 'checkpoint-latest.pth').exists()
    assert snapshot(first) == before
    line = one_error_line(cli('fastconvmae_demo', '--epochs', '1', '--output', first, cwd=tmp_path), 'already holds a run', '--overwrite')
    assert '--resume' not in line   # the demo has no --resume: the line does not offer one
    assert snapshot(first) == before
    one_error_line(cli('fastconvmae_demo', '--epochs', '0', cwd=tmp_path), '--epochs must be a positive integer')
    r = cli('fastconvmae_demo', '--epochs', '1', '--seed', '1', '--output', first, '--overwrite', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot(first)['checkpoint-latest.pth'] != before['checkpoint-latest.pth']  # another seed: the new run replaced it

# ---------------------------------------------------------------- options: whole names, and only the mode's own
@pytest.mark.parametrize('script', SCRIPTS)
def test_no_prefix_matching(script, tmp_path):
    "`--hel` is not `--help`: every parser takes whole option names only, and says so in one line."
    pos = {'fastconvmae_finetune': ['x'], 'fastconvmae_linprobe': ['x'], 'fastconvmae_knn': ['x'],
           'fastconvmae_detect': ['train'], 'fastconvmae_segment': ['train', 'x']}.get(script, [])
    one_error_line(cli(script, *pos, '--hel', cwd=tmp_path, timeout=300), 'unrecognized arguments: --hel', 'did you mean --help?')

def test_finetune_output_dir_is_output(tmp_path):
    "`--output` is the run folder of every command; fine-tuning's old `--output_dir` still means the same, and neither is a prefix of the other."
    one_error_line(cli('fastconvmae_finetune', 'data', '--output', 'o', cwd=tmp_path, timeout=300), 'dataset folder not found')
    one_error_line(cli('fastconvmae_finetune', 'data', '--output_dir', 'o', cwd=tmp_path, timeout=300), 'dataset folder not found')
    one_error_line(cli('fastconvmae_finetune', 'data', '--output_d', 'o', cwd=tmp_path, timeout=300), 'unrecognized arguments: --output_d', 'did you mean --output?')
    assert not (tmp_path / 'o').exists()

@pytest.mark.parametrize('args,needles', [
    (['train', '--data', 'nowhere', '--checkpoint', 'w.pth'], ['--checkpoint does not apply to `fastconvmae_detect train`', '--pretrained']),
    (['evaluate', '--data', 'nowhere', '--pretrained', 'w.pth'], ['--pretrained does not apply', '--checkpoint']),
    (['predict', '--checkpoint', 'w.pth', '--data', 'nowhere'], ['--data does not apply', 'IMAGES']),
    (['evaluate', '--checkpoint', 'w.pth', '--data', 'nowhere', '--epochs', '3'], ['--epochs does not apply', 'train']),
])
def test_detect_refuses_options_of_other_modes(args, needles, tmp_path):
    "`detect train --checkpoint W` used to train from random weights without a word: now one line names --pretrained."
    one_error_line(cli('fastconvmae_detect', *args, cwd=tmp_path, timeout=300), *needles)
    assert not (tmp_path / 'runs').exists()

@pytest.mark.parametrize('args,needles', [
    (['evaluate', 'nowhere', '--checkpoint', 's.pth', '--output', 'o'], ['--output does not apply to `fastconvmae_segment evaluate`', 'writes nothing']),
    (['predict', 'nowhere', '--checkpoint', 's.pth', '--iters', '3'], ['--iters does not apply', 'train']),
    (['predict', 'nowhere', '--checkpoint', 's.pth', '--preset', 'ade20k'], ['--preset does not apply', 'checkpoint']),
    (['dance', 'nowhere'], ["unknown command 'dance'"]),
])
def test_segment_refuses_options_of_other_modes(args, needles, tmp_path):
    one_error_line(cli('fastconvmae_segment', *args, cwd=tmp_path, timeout=300), *needles)
    assert not (tmp_path / 'o').exists()

# ---------------------------------------------------------------- training commands keep what they trained
FAST = ['--epochs', '1', '--warmup_epochs', '0.5', '--bs', '4', '--num_workers', '0', '--precision', 'fp32']

@pytest.mark.parametrize('script,folder,product', [('fastconvmae_finetune', 'finetune', 'finetuned.pth'),
                                                   ('fastconvmae_linprobe', 'linprobe', 'linprobe.pth')])
def test_training_commands_write_a_default_folder(script, folder, product, tmp_path):
    "Without --output_dir a run goes to runs/<task>; a second run there is refused, and the first is untouched."
    make_toy(tmp_path / 'data')
    r = cli(script, 'data', *FAST, '--model', 'convvit_tiny_patch16', '--img_size', '64', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / 'runs' / folder
    assert (out / product).exists() and (out / 'checkpoint-latest.pth').exists() and (out / 'history.csv').exists()
    before = snapshot(out)
    one_error_line(cli(script, 'data', *FAST, '--model', 'convvit_tiny_patch16', '--img_size', '64', cwd=tmp_path),
                   'already holds a run', '--overwrite')
    one_error_line(cli(script, 'nowhere', *FAST, '--overwrite', cwd=tmp_path), 'nowhere')  # a typo with --overwrite deletes nothing
    assert snapshot(out) == before

# ---------------------------------------------------------------- make bench
def test_make_bench_flags_exist():
    "The Makefile's `bench` line parses with the benchmark's own parser (it once passed a removed --arch)."
    r = subprocess.run(['make', '-n', '-s', 'bench'], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if 'pretrain_step.py' in l)
    args = shlex.split(line)
    args = args[args.index(next(a for a in args if a.endswith('pretrain_step.py'))) + 1:]
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import pretrain_step
    a = pretrain_step.parser().parse_args(args)
    assert a.config == 'base' and a.bs == 4
