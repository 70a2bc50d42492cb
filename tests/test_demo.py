"""`run_demo`'s figures say what the model saw."""
from pathlib import Path
import matplotlib; matplotlib.use('Agg')
from fastconvmae.demo import run_demo

REPO = Path(__file__).resolve().parents[1]

def test_reconstruction_title_says_whether_the_cat_was_a_training_photo(tmp_path):
    "On the bundled photos the cat is one of the five training images, and the reconstruction's title says so."
    res = run_demo(REPO / 'data', output=tmp_path / 'demo', epochs=1, log=lambda *a: None)
    title = res['figs']['reconstruction']._suptitle.get_text()
    assert title.startswith('after 1 epoch (') and title.endswith('one of its training photos'), title
    assert (tmp_path / 'demo' / 'reconstruction.png').exists()
