"""Datasets, splits, the task sampler and the errors on bad input.

Tests that need the real datasets read them from $IMAML_DATA (scripts/test.sh points it at
../shared/data when that exists) and skip, saying so, when it is absent.
"""
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imaml.data import DataError, ImageClasses, TaskSampler, load_miniimagenet, load_omniglot, load_split
from imaml.data import omniglot as omni
from imaml.data.omniglot import omniglot_split, split_names
from conftest import DATA, needs_omniglot

HAVE_MINI = bool(DATA) and (Path(DATA) / "miniimagenet" / "train.csv").exists()
needs_mini = pytest.mark.skipif(not HAVE_MINI, reason="Mini-ImageNet not found: set IMAML_DATA to "
                                "a folder holding miniimagenet/{images.zip,train.csv,val.csv,test.csv}")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("IMAML_CACHE", str(d))
    return d


def toy_classes(num_classes=6, per_class=8, size=5, channels=1):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_classes * per_class, channels, size, size), generator=g,
                           dtype=torch.uint8)
    offsets = torch.arange(num_classes + 1) * per_class
    return ImageClasses(images, offsets, [f"c{i}" for i in range(num_classes)])


# -- Omniglot on the real data ------------------------------------------------------------------

@needs_omniglot
def test_omniglot_loads_all_characters():
    classes, sets = load_omniglot(DATA)
    assert classes.num_classes == 1623 and tuple(classes.images.shape) == (1623 * 20, 1, 28, 28)
    assert bool((classes.counts == 20).all())
    assert sum(s == "images_background" for s in sets.values()) == 964
    assert sum(s == "images_evaluation" for s in sets.values()) == 659
    assert classes.images.dtype == torch.uint8 and classes.images.max() == 255


def test_shipped_splits_are_disjoint_and_complete():
    for kind in ("random", "alphabet"):
        s = split_names(kind)
        tr, va, te = (set(s[k]) for k in ("meta_train", "meta_val", "meta_test"))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(tr | va | te) == 1623
    s = split_names("random")
    assert len(s["meta_train"]) + len(s["meta_val"]) == 1200 and len(s["meta_test"]) == 423
    with pytest.raises(ValueError, match="unknown Omniglot split"):
        split_names("bogus")


@needs_omniglot
def test_omniglot_splits_and_rotations():
    train = omniglot_split("meta_train", DATA)
    test = omniglot_split("meta_test", DATA)
    assert train.num_classes == 4 * 1100 and test.num_classes == 423
    base = {n.split("@")[0] for n in train.names}
    assert not base & set(test.names)
    # class "x@90" holds the drawings of "x" rotated by 90 degrees
    char = train.names[0].split("@")[0]
    i0, i90 = train.names.index(char + "@0"), train.names.index(char + "@90")
    a = train.images[train.offsets[i0]:train.offsets[i0 + 1]]
    b = train.images[train.offsets[i90]:train.offsets[i90 + 1]]
    assert torch.equal(torch.rot90(a, 1, dims=(2, 3)), b)


@needs_omniglot
def test_same_seed_same_tasks_in_a_new_process(tmp_path):
    code = ("import sys, torch; from imaml.data import TaskSampler; "
            "from imaml.data.omniglot import omniglot_split; "
            "s = TaskSampler(omniglot_split('meta_test', sys.argv[1], progress=lambda m: None), 20, 5, 5, seed=7); "
            "b = s.batch([3, 11]); torch.save((b.x_support, b.y_support, b.x_query), sys.argv[2])")
    out = tmp_path / "tasks.pt"
    subprocess.run([sys.executable, "-c", code, DATA, str(out)], check=True)
    s = TaskSampler(omniglot_split("meta_test", DATA), 20, 5, 5, seed=7)
    b = s.batch([3, 11])
    xs, ys, xq = torch.load(out)
    assert torch.equal(xs, b.x_support) and torch.equal(ys, b.y_support) and torch.equal(xq, b.x_query)
    assert not torch.equal(s.batch([4]).x_support[0], b.x_support[0])
    assert not torch.equal(TaskSampler(s.classes, 20, 5, 5, seed=8).batch([3]).x_support[0], b.x_support[0])


# -- Mini-ImageNet ------------------------------------------------------------------------------

@pytest.mark.slow
@needs_mini
def test_miniimagenet_csv_layout(cache):
    # the three split files as the loader reads them: 64/16/20 disjoint classes of 600 images
    # (read, not decoded: decoding all 60,000 images took 44 s of a CI run)
    from imaml.data.miniimagenet import SPLIT_FILES, _read_csv
    root = Path(DATA) / "miniimagenet"
    lists = {s: _read_csv(root / f"{SPLIT_FILES[s]}.csv") for s in SPLIT_FILES}
    assert [len(lists[s]) for s in ("meta_train", "meta_val", "meta_test")] == [64, 16, 20]
    assert {len(files) for per_class in lists.values() for files in per_class.values()} == {600}
    names = [set(c) for c in lists.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    # one split decoded and cached (its 9,600 images), then loaded from the cache
    val = load_miniimagenet("meta_val", DATA)
    assert val.num_classes == 16 and set(val.names) == set(lists["meta_val"])
    assert tuple(val.images.shape) == (16 * 600, 3, 84, 84) and val.images.dtype == torch.uint8
    again = load_miniimagenet("meta_val", DATA)  # from the cache
    assert torch.equal(again.images, val.images)


def write_pickle_cache(folder, split, classes, per_class=6):
    images, class_dict = [], {}
    for c in classes:
        class_dict[c] = list(range(len(images), len(images) + per_class))
        images += [np.full((84, 84, 3), hash(c) % 256, dtype=np.uint8) for _ in range(per_class)]
    with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as fh:
        pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, fh)


def test_miniimagenet_pickle_layout(tmp_path, cache):
    root = tmp_path / "miniimagenet"
    root.mkdir()
    counts = {"train": 64, "val": 16, "test": 20}
    for split, n in counts.items():
        write_pickle_cache(root, split, [f"n{split}{i:03d}" for i in range(n)])
    loaded = {s: load_miniimagenet(s, str(tmp_path)) for s in ("meta_train", "meta_val", "meta_test")}
    assert [c.num_classes for c in loaded.values()] == [64, 16, 20]
    sets = [set(c.names) for c in loaded.values()]
    assert not (sets[0] & sets[1] | sets[0] & sets[2] | sets[1] & sets[2])
    c = loaded["meta_train"]
    assert tuple(c.images.shape) == (64 * 6, 3, 84, 84)
    assert int(c.images[c.offsets[5], 0, 0, 0]) == hash("ntrain005") % 256
    b = TaskSampler(c, 5, 1, 5).batch([0])
    assert tuple(b.x_support.shape) == (1, 5, 3, 84, 84)


# -- the sampler ----------------------------------------------------------------------------

def test_sampler_shapes_labels_and_disjoint_support_query():
    classes = toy_classes()
    s = TaskSampler(classes, ways=3, shots=2, queries=4, seed=1)
    b = s.batch(range(5))
    assert tuple(b.x_support.shape) == (5, 6, 1, 5, 5) and tuple(b.x_query.shape) == (5, 12, 1, 5, 5)
    assert b.y_support[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert 0.0 <= float(b.x_support.min()) and float(b.x_support.max()) <= 1.0
    flat = (classes.images.float() / 255).flatten(1)
    for t in b.tasks():
        rows = lambda x: [int((flat == im.flatten()).all(1).nonzero()[0]) for im in x]  # noqa: E731
        sup, qry = rows(t.x_support), rows(t.x_query)
        assert not set(sup) & set(qry)
        # each label's images come from one class, and different labels from different classes
        cls = lambda idx: idx // 8  # noqa: E731
        for lab in range(3):
            owners = {cls(i) for i, y in zip(sup, t.y_support.tolist()) if y == lab}
            owners |= {cls(i) for i, y in zip(qry, t.y_query.tolist()) if y == lab}
            assert len(owners) == 1
    # labels are permuted per task: class c does not always get the same label
    first_class = [int((flat == b.x_support[i, 0].flatten()).all(1).nonzero()[0]) // 8 for i in range(5)]
    assert len(set(first_class)) > 1


def test_sampler_ragged_classes():
    base = toy_classes(num_classes=4, per_class=8)
    offsets = torch.tensor([0, 8, 14, 24, 32])  # 8, 6, 10, 8 images
    classes = ImageClasses(base.images, offsets, base.names)
    b = TaskSampler(classes, 4, 2, 4).batch(range(20))
    assert tuple(b.x_query.shape) == (20, 16, 1, 5, 5)
    # every image drawn lies in the range of its own class, with no image used twice in a
    # task: the class of 6 images gives exactly its 6 (2 support + 4 query) to every task
    flat = (classes.images.float() / 255).flatten(1)
    owner = torch.bucketize(torch.arange(32), offsets[1:], right=True)  # image row -> class
    for t in b.tasks():
        rows = [int((flat == im.flatten()).all(1).nonzero()[0])
                for im in torch.cat([t.x_support, t.x_query])]
        labels = torch.cat([t.y_support, t.y_query]).tolist()
        assert len(set(rows)) == len(rows) == 24
        for lab in range(4):
            assert len({int(owner[r]) for r, y in zip(rows, labels) if y == lab}) == 1
        small = [r for r in rows if int(owner[r]) == 1]
        assert sorted(small) == list(range(8, 14))


# -- bad input --------------------------------------------------------------------------------

def test_missing_and_wrong_directories(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot(str(tmp_path / "nope"))
    (tmp_path / "afile").write_text("x")  # a file where the folder is expected: not "missing"
    with pytest.raises(DataError, match="afile is a file, not a folder"):
        load_omniglot(str(tmp_path / "afile"))
    with pytest.raises(DataError, match=r"Omniglot not found in .*images_background.zip.*--download"):
        load_omniglot(str(tmp_path))
    monkeypatch.delenv("IMAML_DATA", raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        load_miniimagenet("meta_val", None)
    with pytest.raises(DataError, match="Mini-ImageNet meta_train not found.*no official download"):
        load_miniimagenet("meta_train", str(tmp_path))


def test_download_without_network_says_so(tmp_path, cache, monkeypatch):
    # port 9 (discard) on loopback: connection refused at once, as on a machine without network
    monkeypatch.setattr(omni, "URL", "http://127.0.0.1:9/{}.zip")
    with pytest.raises(DataError, match="could not download .*no network"):
        load_omniglot(str(tmp_path), download_missing=True)
    assert not list(tmp_path.glob("*.part"))
    # with no folder named at all, the download into the cache is attempted by default
    monkeypatch.delenv("IMAML_DATA", raising=False)
    with pytest.raises(DataError, match=f"could not download .*{cache}/data/omniglot"):
        load_omniglot(None)


def test_download_checks_the_checksum(tmp_path, cache, monkeypatch):
    src = tmp_path / "server"
    src.mkdir()
    for s in omni.SETS:
        (src / f"{s}.zip").write_bytes(b"not the real file")
    with pytest.raises(DataError, match="MD5"):
        omni.download(tmp_path / "dest", url_template="file://" + str(src) + "/{}.zip")
    assert not list((tmp_path / "dest").glob("*.zip"))


def make_omniglot_zips(folder, corrupt=None):
    """A tiny Omniglot in the official layout: 2 alphabets x 2 characters x 3 drawings."""
    for s in omni.SETS:
        with zipfile.ZipFile(folder / f"{s}.zip", "w") as zf:
            for a in ("Alpha", "Beta"):
                for c in ("character01", "character02"):
                    for k in range(3):
                        im = Image.fromarray((np.random.rand(105, 105) > 0.5).astype(np.uint8) * 255).convert("1")
                        import io
                        buf = io.BytesIO()
                        im.save(buf, format="PNG")
                        data = buf.getvalue()
                        if corrupt == "image" and s == omni.SETS[1] and k == 2:
                            data = data[:20]
                        zf.writestr(f"{s}/{s[7:]}{a}/{c}/{k:04d}_{k:02d}.png", data)


def test_tiny_omniglot_from_zips_and_folders(tmp_path, cache):
    make_omniglot_zips(tmp_path)
    classes, sets = load_omniglot(str(tmp_path))
    assert classes.num_classes == 8 and tuple(classes.images.shape) == (24, 1, 28, 28)
    ext = tmp_path / "extracted"
    ext.mkdir()
    for s in omni.SETS:
        zipfile.ZipFile(tmp_path / f"{s}.zip").extractall(ext)
    classes2, _ = load_omniglot(str(ext))
    assert classes2.names == classes.names and torch.equal(classes2.images, classes.images)


def test_truncated_or_corrupt_zip(tmp_path, cache):
    make_omniglot_zips(tmp_path)
    z = tmp_path / "images_evaluation.zip"
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    with pytest.raises(DataError, match="images_evaluation.zip is not a readable zip file.*truncated or corrupt"):
        load_omniglot(str(tmp_path))


def test_corrupt_image(tmp_path, cache):
    make_omniglot_zips(tmp_path, corrupt="image")
    with pytest.raises(DataError, match=r"\.png is not a readable image"):
        load_omniglot(str(tmp_path))


def test_csv_naming_missing_files(tmp_path, cache):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((84, 84, 3), dtype=np.uint8)).save(root / "images" / "a.jpg")
    (root / "train.csv").write_text("filename,label\na.jpg,n1\nb.jpg,n1\nc.jpg,n2\n")
    with pytest.raises(DataError, match=r"train.csv names 2 images that are not in .*images"):
        load_miniimagenet("meta_train", str(tmp_path))
    (root / "train.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        load_miniimagenet("meta_train", str(tmp_path))


def test_corrupt_pickle(tmp_path, cache):
    root = tmp_path / "miniimagenet"
    root.mkdir()
    write_pickle_cache(root, "val", ["a", "b"])
    p = root / "mini-imagenet-cache-val.pkl"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_miniimagenet("meta_val", str(tmp_path))


def test_unreadable_files_are_named_as_such(tmp_path, cache, monkeypatch):
    """Permission errors (which root, who runs the tests, never meets, hence the patches) name
    the file and say "permission denied", not "corrupt, download again"."""
    import errno
    from imaml.data import common
    from imaml.data import miniimagenet as mini

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    make_omniglot_zips(tmp_path)
    ext = tmp_path / "extracted"
    for s in omni.SETS:
        zipfile.ZipFile(tmp_path / f"{s}.zip").extractall(ext)
    with monkeypatch.context() as m:
        m.setattr(common.zipfile, "ZipFile", denied)
        with pytest.raises(DataError, match=r"images_\w+\.zip: permission denied \(Permission "
                           r"denied\); make it readable") as e:
            load_omniglot(str(tmp_path))
        assert "corrupt" not in str(e.value)
    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", denied)
        with pytest.raises(DataError, match=r"\.png: permission denied"):
            load_omniglot(str(ext))
    root = tmp_path / "miniimagenet"
    root.mkdir()
    write_pickle_cache(root, "val", ["a", "b"])
    with monkeypatch.context() as m:
        m.setattr(mini, "open", denied, raising=False)
        with pytest.raises(DataError, match=r"cache-val\.pkl: permission denied") as e:
            load_miniimagenet("meta_val", str(tmp_path), use_cache=False)
        assert "corrupt" not in str(e.value)
    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", denied)
        with pytest.raises(DataError, match="permission denied.*set IMAML_CACHE"):
            common.cache_dir()


def test_impossible_tasks_and_unknown_names():
    classes = toy_classes(num_classes=6, per_class=8)
    with pytest.raises(ValueError, match="7-way tasks need 7 classes but this split has only 6"):
        TaskSampler(classes, ways=7, shots=1, queries=1)
    with pytest.raises(ValueError, match="fewer than shots \\+ queries = 9"):
        TaskSampler(classes, ways=5, shots=4, queries=5)
    with pytest.raises(ValueError, match="shots and queries"):
        TaskSampler(classes, ways=5, shots=0, queries=5)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_split("cifar", "meta_train")
    with pytest.raises(ValueError, match="unknown split"):
        load_miniimagenet("train")


def test_cli_reports_errors_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "imaml.cli", "eval", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "error: checkpoint" in out.stderr and "Traceback" not in out.stderr


def test_cache_rebuilds_when_damaged_or_stale(tmp_path, cache):
    make_omniglot_zips(tmp_path)
    first, _ = load_omniglot(str(tmp_path))
    (cached,) = list(cache.glob("omniglot-*.pt"))
    # bytes flipped inside the cached pixels: detected by the checksum and rebuilt, not served
    raw = bytearray(cached.read_bytes())
    i = raw.find(first.images.contiguous().numpy().tobytes()[:64])
    assert i > 0
    raw[i + 10] ^= 0xFF
    cached.write_bytes(bytes(raw))
    again, _ = load_omniglot(str(tmp_path))
    assert torch.equal(again.images, first.images)
    # an image replaced inside an extracted folder changes the key: no old pixels served
    ext = tmp_path / "extracted"
    for s in omni.SETS:
        zipfile.ZipFile(tmp_path / f"{s}.zip").extractall(ext)
    before, _ = load_omniglot(str(ext))
    png = sorted((ext / omni.SETS[0]).rglob("*.png"))[0]
    other = sorted((ext / omni.SETS[0]).rglob("*.png"))[-1]
    png.write_bytes(other.read_bytes())
    after, _ = load_omniglot(str(ext))
    assert not torch.equal(after.images, before.images)


def test_cache_list_and_prune(tmp_path, cache):
    from imaml import cli
    make_omniglot_zips(tmp_path)
    load_omniglot(str(tmp_path))
    assert len(list(cache.glob("*.pt"))) == 1
    assert cli.main(["cache", "list"]) == 0
    assert cli.main(["cache", "prune"]) == 0
    assert list(cache.glob("*.pt")) == []


def test_cache_prune_deletes_only_what_the_cache_wrote(tmp_path, cache, capsys):
    """IMAML_CACHE pointed at a folder that also holds checkpoints and other torch files:
    prune deletes the decoded dataset (it carries the cache's header and its key) and nothing
    else; list does not call the others decoded datasets."""
    from imaml import cli
    from imaml.checkpoint import build_network, save_checkpoint
    make_omniglot_zips(tmp_path)
    load_omniglot(str(tmp_path))
    (decoded,) = list(cache.glob("omniglot-*.pt"))
    for name in ("best.pt", "last.pt"):
        save_checkpoint(cache / name, build_network("omniglot", 3), dataset="omniglot", ways=3,
                        shots=1, queries=1, method={"name": "imaml-gd"})
    torch.save({"key": "x", "digest": "y"}, cache / "omniglot-other.pt")  # a name alone proves nothing
    (cache / "notes.pt").write_text("not even a torch file")
    capsys.readouterr()
    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "1 decoded dataset(s)" in out and decoded.name in out
    assert "left alone: 4 other file(s)" in out and "best.pt" in out.split("left alone")[1]
    assert cli.main(["cache", "prune"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 of 1 decoded dataset(s)" in out
    assert sorted(p.name for p in cache.iterdir()) == ["best.pt", "last.pt", "notes.pt",
                                                         "omniglot-other.pt"]


def test_csv_with_repeated_rows_or_only_a_header_is_refused(tmp_path, cache):
    root = tmp_path / "miniimagenet"
    (root / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(np.zeros((84, 84, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "train.csv").write_text("filename,label\na.jpg,n1\nb.jpg,n1\na.jpg,n1\n")
    with pytest.raises(DataError, match=r"train.csv, line 4: a.jpg is listed again \(first on "
                                        r"line 2\).*remove the repeated rows"):
        load_miniimagenet("meta_train", str(tmp_path))
    (root / "train.csv").write_text("filename,label\n")
    with pytest.raises(DataError, match=r"train.csv lists no images \(only its header\)"):
        load_miniimagenet("meta_train", str(tmp_path))
