"""The package's layering, read from the source: no import cycle; the engine (Part II) imports no lesson or task; a task
imports no other task except its own parent; `fastconvmae --help` does not import torch."""
import ast, subprocess, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1] / 'fastconvmae'
ENGINE = {'cli', 'checkpoint', 'training', 'data', 'kernels'}           # Part II: imported by everything above, imports none of it
LESSONS = {'masking', 'maskconv', 'encoder', 'models', 'backbone'}
TASKS = {'pretrain', 'mor', 'finetune', 'linprobe', 'knn', 'detection', 'segmentation', 'demo', 'visualise', 'predict', 'export'}
#: a task may import its own parent, no other task: MoR extends pretraining, the linear probe reuses fine-tuning's recipe
#: pieces, the demo is a short pretraining, and export writes the classifiers that predict reads (with its loader)
PARENT = {'mor': 'pretrain', 'linprobe': 'finetune', 'demo': 'pretrain', 'export': 'predict'}
TOP = {'command'}                                            # the `fastconvmae` command composes the tasks
PRIVATE = {'_modidx', '__init__'}

def _is_main_guard(node) -> bool:
    "`if __name__ == '__main__':` (what `python -m fastconvmae.pretrain` runs is the command, above the module)"
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == '__name__'
            and any(isinstance(c, ast.Constant) and c.value == '__main__' for c in t.comparators))

def package_imports(path: Path) -> set[str]:
    "The package modules `path` imports, at the top or inside functions (not under a `__main__` guard)"
    out, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        n = todo.pop()
        if _is_main_guard(n): continue
        if isinstance(n, ast.ImportFrom):
            if n.level == 1 and n.module: out.add(n.module.split('.')[0])
            elif n.level == 1: out.update(a.name for a in n.names)
            elif n.module and n.module.startswith('fastconvmae.'): out.add(n.module.split('.')[1])
            elif n.module == 'fastconvmae': out.update(a.name for a in n.names if (PKG / f'{a.name}.py').exists())
        elif isinstance(n, ast.Import):
            out.update(a.name.split('.')[1] for a in n.names if a.name.startswith('fastconvmae.'))
        todo.extend(ast.iter_child_nodes(n))
    return {m for m in out if (PKG / f'{m}.py').exists()}

GRAPH = {p.stem: package_imports(p) - {p.stem} for p in PKG.glob('*.py') if p.stem not in PRIVATE}

def test_every_module_has_a_layer():
    assert set(GRAPH) == ENGINE | LESSONS | TASKS | TOP, set(GRAPH) ^ (ENGINE | LESSONS | TASKS | TOP)

def test_no_import_cycle():
    state = {}
    def visit(m, path):
        if state.get(m) == 'done': return
        assert state.get(m) != 'open', f"import cycle: {' -> '.join(path + [m])}"
        state[m] = 'open'
        for d in sorted(GRAPH[m]): visit(d, path + [m])
        state[m] = 'done'
    for m in sorted(GRAPH): visit(m, [])

@pytest.mark.parametrize('m', sorted(ENGINE))
def test_engine_imports_no_lesson_or_task(m):
    assert not GRAPH[m] & (LESSONS | TASKS | TOP), f"{m} (engine) imports {sorted(GRAPH[m] & (LESSONS | TASKS | TOP))}"

def test_cli_imports_nothing_of_the_package():
    assert GRAPH['cli'] == set()

@pytest.mark.parametrize('m', sorted(LESSONS))
def test_lessons_import_no_task(m):
    assert not GRAPH[m] & (TASKS | TOP), f"{m} imports {sorted(GRAPH[m] & (TASKS | TOP))}"

@pytest.mark.parametrize('m', sorted(TASKS))
def test_task_imports_only_its_parent(m):
    others = GRAPH[m] & (TASKS | TOP) - {PARENT.get(m)}
    assert not others, f"{m} imports the tasks {sorted(others)} (only its parent {PARENT.get(m)} is allowed)"

def test_the_reader_sees_imports():  # the checks above would pass vacuously if the reader saw nothing
    assert {'cli', 'checkpoint', 'training'} <= GRAPH['pretrain'] and 'pretrain' in GRAPH['mor']
    assert {'pretrain', 'mor', 'knn'} <= GRAPH['command']

def test_help_does_not_import_torch():
    "`fastconvmae --help`, as a user runs it (the console script): no torch among the modules it imported"
    import os
    exe = Path(sys.executable).parent / 'fastconvmae'
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPROFILEIMPORTTIME': '1'})
    assert r.returncode == 0 and 'subcommands:' in r.stdout, r.stdout + r.stderr
    imported = [l.rsplit('|', 1)[-1].strip() for l in r.stderr.splitlines() if l.startswith('import time:')]
    assert 'fastconvmae.command' in imported and 'fastconvmae.cli' in imported   # the profile did see our imports
    assert not [m for m in imported if m == 'torch' or m.startswith('torch.')], 'fastconvmae --help imported torch'
