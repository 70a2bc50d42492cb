"""Write README.md from nbs/index.ipynb (what `nbdev_readme` does, without needing Quarto).

Markdown cells are copied; code cells become ```python blocks followed by their text output.
    python tools/readme.py          # write README.md
    python tools/readme.py --check  # exit 1 if README.md is out of date
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path=ROOT / 'nbs' / 'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip('\n')
        if c['cell_type'] == 'markdown': out.append(src.replace('](images/', '](nbs/images/'))  # notebook-relative image links
        elif c['cell_type'] == 'code' and src and not src.startswith('#| hide'):
            out.append(f'```python\n{src}\n```')
            texts = [''.join(o.get('text', '')) if o.get('name') == 'stdout' else ''.join(o.get('data', {}).get('text/plain', ''))
                     for o in c.get('outputs', []) if o.get('name') != 'stderr']
            texts = [t.rstrip('\n') for t in texts if t.strip()]
            if texts: out.append('```\n' + '\n'.join(texts) + '\n```')
    return '<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != text: sys.exit('README.md is out of date: run `python tools/readme.py`')
    else: readme.write_text(text)
