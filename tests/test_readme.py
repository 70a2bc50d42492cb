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
