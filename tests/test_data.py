"Tests of `fastconvmae.data` beyond the notebook's: run with `python -m pytest -q tests/test_data.py`"
import shutil, subprocess, sys, textwrap, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from fastconvmae.data import (BadImageError, BadImageReport, BadImageWarning, ImageFolderDataset, PretrainDL,
                              eval_transform, find_images, load_rgb, pretrain_dls, pretrain_transform, to_rgb)

DATA = Path(__file__).resolve().parents[1]/'data'

def _folder(root:Path, n:int=8, bad:int|None=None) -> Path:
    "`n` copies of the bundled photos in a flat folder, the `bad`-th truncated"
    root.mkdir(parents=True, exist_ok=True)
    photos = sorted(DATA.glob('*.jpg'))
    for i in range(n): shutil.copy(photos[i % len(photos)], root/f'img{i}.jpg')
    if bad is not None: (root/f'img{bad}.jpg').write_bytes((root/f'img{bad}.jpg').read_bytes()[:2000])
    return root

def test_bundled_photos():
    files, labels, classes = find_images(DATA)
    assert [f.name for f in files] == ['astronaut.jpg', 'camera.jpg', 'chelsea.jpg', 'coffee.jpg', 'rocket.jpg']
    assert classes == [] and labels == [-1]*5
    assert Image.open(DATA/'camera.jpg').mode == 'L' and load_rgb(DATA/'camera.jpg').mode == 'RGB'
    assert sum(f.stat().st_size for f in DATA.iterdir()) < 1_000_000

@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'PA', 'RGBA', 'CMYK', 'YCbCr', 'I;16', 'I', 'F', '1'])
def test_modes_to_rgb(tmp_path, mode):
    "Every mode converts, in memory and (where the format can store it) through a file"
    im = Image.new('RGB', (8, 8), (200, 100, 50))
    im = (Image.fromarray(np.full((8, 8), 30000, np.uint16)) if mode == 'I;16' else im.convert(mode))
    assert to_rgb(im).mode == 'RGB'
    if mode in ('PA', 'YCbCr'): return
    f = tmp_path/('x.tif' if mode in ('I', 'F', 'CMYK') else 'x.png')
    im.save(f)
    res = load_rgb(f)
    assert res.mode == 'RGB' and res.size == (8, 8)
    if mode == 'I;16': assert res.getpixel((0, 0)) == (117, 117, 117)  # 30000/257, not clipped to 255

def test_exif_orientation(tmp_path):
    im = Image.new('RGB', (40, 20), (0, 0, 255))
    exif = Image.Exif(); exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path/'r.jpg', exif=exif)
    assert load_rgb(tmp_path/'r.jpg').size == (20, 40)

def test_bad_file_errors(tmp_path):
    _folder(tmp_path, n=2, bad=1)
    with pytest.raises(BadImageError, match='img1.jpg'): load_rgb(tmp_path/'img1.jpg')
    with pytest.raises(FileNotFoundError, match='nope'): ImageFolderDataset(tmp_path/'nope')
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='empty'): ImageFolderDataset(tmp_path/'empty')
    with pytest.raises(FileNotFoundError, match='nope'): pretrain_dls(tmp_path/'nope', num_workers=0)

def test_truncated_skipped_warned_once(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path, bad=3), pretrain_transform(32))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        items = [ds[i] for i in range(len(ds))] + [ds[3]]
    ws = [w for w in ws if issubclass(w.category, BadImageWarning)]
    assert len(ws) == 1 and 'img3.jpg' in str(ws[0].message)
    assert ds.n_skipped == 2 and ds.bad_files == [tmp_path/'img3.jpg']
    assert items[3][0].shape == (3, 32, 32) and len(items) == 9

def test_all_bad_raises(tmp_path):
    for i in range(3): (tmp_path/f'{i}.jpg').write_bytes(b'junk')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(RuntimeError, match='consecutive unreadable'): ImageFolderDataset(tmp_path)[0]

def test_workers_count_in_main_process(tmp_path):
    dls = pretrain_dls(_folder(tmp_path, bad=5), img_size=32, bs=2, num_workers=2, valid=2, device='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', BadImageWarning)
        assert [len(x) for x, y in dls.train] == [2]*4
    assert dls.train_ds.n_skipped == 1 and dls.train_ds.bad_files == [tmp_path/'img5.jpg']

def test_spawned_workers_share_counts(tmp_path):
    "Counts also reach the main process with the 'spawn' start method (Python 3.14 defaults to 'forkserver')"
    _folder(tmp_path, n=4, bad=2)
    code = textwrap.dedent(f"""
        import multiprocessing, warnings; multiprocessing.set_start_method('spawn', force=True)
        warnings.simplefilter('ignore')
        from fastconvmae.data import pretrain_dls
        if __name__ == '__main__':
            dls = pretrain_dls({str(tmp_path)!r}, img_size=32, bs=2, num_workers=1, valid=1, device='cpu')
            assert [len(x) for x, y in dls.train] == [2, 2]
            print('SKIPPED', dls.train_ds.n_skipped)
        """)
    (tmp_path/'spawn_check.py').write_text(code)
    res = subprocess.run([sys.executable, str(tmp_path/'spawn_check.py')], capture_output=True, text=True, timeout=600)
    assert 'SKIPPED 1' in res.stdout, res.stdout + res.stderr

def test_epoch_seeds_and_shards():
    dl = PretrainDL(list(range(11)), bs=2, shuffle=True, seed=3)
    e0 = dl.get_idxs(); list(dl); e1 = dl.get_idxs()
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(11))
    shards = [PretrainDL(list(range(11)), bs=2, shuffle=True, seed=3, rank=r, world_size=4).get_idxs() for r in range(4)]
    assert [len(s) for s in shards] == [3]*4 and set(sum(shards, [])) == set(range(11))
    assert sum(shards, []).count(e0[0]) == 2  # padding repeats the start of the permutation
    assert len(PretrainDL(list(range(11)), bs=2, world_size=4, drop_last=True)) == 1

def test_eval_transform_sizes():
    im = Image.open(DATA/'rocket.jpg')
    assert eval_transform(224)(im).shape == (3, 224, 224)
    assert eval_transform((128, 192), crop_pct=1.0)(im).shape == (3, 128, 192)

def test_learner_with_report(tmp_path, capsys):
    from fastai.learner import Learner
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', BadImageWarning)
        dls = pretrain_dls(_folder(tmp_path, bad=0), img_size=32, bs=4, num_workers=0, valid=2, device='cpu')
        learn = Learner(dls, torch.nn.Conv2d(3, 3, 1), loss_func=lambda pred, *_: pred.pow(2).mean())
        rep = BadImageReport()
        with learn.no_logging(): learn.fit(1, 1e-3, cbs=rep)
    assert rep.history == [dict(epoch=0, skipped=1, files=[str(tmp_path/'img0.jpg')])]
    assert 'skipped 1 unreadable image(s): ' in capsys.readouterr().out

def test_valid_picks_skip_bad_files(tmp_path):
    "The fixed validation images are distinct readable files; the bad one is warned about once in all"
    _folder(tmp_path, bad=0)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        dls = pretrain_dls(tmp_path, img_size=32, bs=4, num_workers=0, valid=3, device='cpu')
        for epoch in range(2): assert [len(x) for x, y in dls.train] == [4, 4]
    assert [f.name for f in dls.valid_ds.files] == ['img1.jpg', 'img4.jpg', 'img7.jpg']
    assert len([w for w in ws if issubclass(w.category, BadImageWarning)]) == 1
    assert dls.valid_ds.n_skipped == 0 and dls.train_ds.bad_files == [tmp_path/'img0.jpg']

def test_symlink_loop_counts_each_file_once(tmp_path):
    "12 images in 3 classes with a loop back to the root and a second link to a class: 12 images, not hundreds"
    photos = sorted(DATA.glob('*.jpg'))
    for i in range(12):
        d = tmp_path/'ds'/f'c{i % 3}'; d.mkdir(parents=True, exist_ok=True); shutil.copy(photos[i % 5], d/f'{i}.jpg')
    (tmp_path/'ds'/'c0'/'loop').symlink_to(tmp_path/'ds')          # c0/loop/c0/loop/... until ELOOP / path limits
    (tmp_path/'ds'/'c1'/'again').symlink_to(tmp_path/'ds'/'c1')    # a folder linking to itself
    (tmp_path/'ds'/'c2'/'alias.jpg').symlink_to(tmp_path/'ds'/'c2'/'2.jpg')
    with pytest.warns(UserWarning, match='3 link.*counted once'):
        files, labels, classes = find_images(tmp_path/'ds')
    assert len(files) == 12 and len({f.resolve() for f in files}) == 12
    assert classes == ['c0', 'c1', 'c2'] and labels == [0]*4 + [1]*4 + [2]*4
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert len(ImageFolderDataset(tmp_path/'ds')) == 12
    (tmp_path/'linked').symlink_to(tmp_path/'ds', target_is_directory=True)   # a linked dataset root still works
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert len(find_images(tmp_path/'linked')[0]) == 12

def test_mark_unreadable_for_evaluation(tmp_path):
    "In 'mark' mode an unreadable file keeps its slot, labelled UNREADABLE, instead of being replaced by its neighbour"
    from fastconvmae.data import UNREADABLE
    _folder(tmp_path, n=4, bad=2)
    ds = ImageFolderDataset(tmp_path, eval_transform(32), unreadable='mark')
    with pytest.warns(BadImageWarning, match='img2.jpg'): items = [ds[i] for i in range(4)]
    assert [y for _, y in items] == [-1, -1, UNREADABLE, -1] and items[2][0].shape == (3, 32, 32)
    assert ds.bad_files == [tmp_path/'img2.jpg']
