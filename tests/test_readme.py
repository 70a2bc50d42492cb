"README.md is generated from nbs/index.ipynb and the two commands it gives are the Makefile's."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_readme_matches_index_notebook():
    sys.path.insert(0, str(ROOT / 'tools'))
    import readme
    assert (ROOT / 'README.md').read_text() == readme.render(), 'README.md is stale: run `python tools/readme.py`'

def test_readme_commands_exist_and_ci_runs_the_test_command():
    text = (ROOT / 'README.md').read_text()
    assert 'make demo' in text and 'make test' in text
    targets = (ROOT / 'Makefile').read_text()
    assert '\ndemo:' in targets and '\ntest:' in targets
    assert 'make test' in (ROOT / '.ci' / 'run').read_text()

# ---------------------------------------------------------------- every command sequence of the README connects
import re, shlex

#: where each command writes when no --output / --output_dir is given, and what a finished run leaves there
DEFAULT_OUT = {'pretrain': 'runs/pretrain', 'finetune': 'runs/finetune', 'linprobe': 'runs/linprobe',
               'detect train': 'runs/detect', 'segment train': 'runs/segment'}
WRITES = {'pretrain': ['checkpoint-latest.pth', 'log.csv'], 'finetune': ['checkpoint-latest.pth', 'finetuned.pth', 'history.csv'],
          'linprobe': ['checkpoint-latest.pth', 'linprobe.pth', 'history.csv'], 'detect train': ['checkpoint-latest.pth', 'log.csv'],
          'segment train': ['checkpoint-latest.pth', 'segmenter.pth']}
MODULES = {'fastconvmae.pretrain': 'pretrain', 'fastconvmae.finetune': 'finetune', 'fastconvmae.linprobe': 'linprobe',
           'fastconvmae.knn': 'knn', 'fastconvmae.detection': 'detect', 'fastconvmae.segmentation': 'segment'}

def readme_commands(text: str) -> list[tuple[str, dict, str]]:
    "Each command line of the README's bash blocks as (task, options, line); continuation lines joined, comments dropped."
    cmds = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split('#')[0].strip()
            if not line or line.startswith(('make ', 'pip ', 'python ')): continue
            w = shlex.split(line)
            if w[0] in ('torchrun', 'accelerate'): w = w[w.index('-m') + 1:]; task = MODULES[w[0]]; rest = w[1:]
            elif w[0] == 'fastconvmae': task, rest = w[1], w[2:]
            else: assert w[0].startswith('fastconvmae_'), line; task, rest = w[0].removeprefix('fastconvmae_'), w[1:]
            if task in ('detect', 'segment'): task, rest = f'{task} {rest[0]}', rest[1:]
            opts, i = {}, 0
            while i < len(rest):
                if rest[i].startswith('--'):
                    has_value = i + 1 < len(rest) and not rest[i + 1].startswith('--')
                    opts[rest[i][2:]] = rest[i + 1] if has_value else True; i += 2 if has_value else 1
                else: i += 1
            cmds.append((task, opts, line, rest))
    return cmds

def test_readme_command_sequences_connect():
    "Every `runs/...` file a README command reads is written by an earlier line, and no line writes into another line's run."
    cmds = readme_commands((ROOT / 'README.md').read_text())
    assert len(cmds) > 15 and any(t == 'segment predict' for t, *_ in cmds)
    made, owner = set(), {}
    for task, o, line, _ in cmds:
        for k in ('checkpoint', 'pretrained', 'resume'):
            p = o.get(k)
            if isinstance(p, str) and p.startswith('runs/'): assert p in made, f"{line}\n  reads {p}, which no earlier line writes"
        if task not in WRITES or (task == 'linprobe' and o.get('quick')): continue
        out = o.get('output') or o.get('output_dir') or (str(Path(o['resume']).parent) if 'resume' in o else DEFAULT_OUT[task])
        if 'resume' not in o:
            assert out not in owner, f"{line}\n  writes into {out}, the run of: {owner.get(out)}"
            owner[out] = line
        made |= {f'{out}/{f}' for f in WRITES[task]}

def test_readme_commands_parse():
    "Every command line of the README is accepted by its subcommand's own parser (no unknown, misspelt or foreign option)"
    import importlib
    from fastconvmae.command import SUBCOMMANDS
    from fastconvmae.cli import parse_command
    import contextlib, io
    for task, _, line, rest in readme_commands((ROOT / 'README.md').read_text()):
        name = task.split()[0]
        mod, fn, _ = SUBCOMMANDS[name]
        f = getattr(importlib.import_module(mod), fn)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try: parse_command(getattr(f, '__wrapped__', f), [task.split()[1]] + rest if ' ' in task else rest, f'fastconvmae {name}')
            except SystemExit as e: raise AssertionError(f"{line}\n  exit {e.code}: {err.getvalue().strip()}") from None
