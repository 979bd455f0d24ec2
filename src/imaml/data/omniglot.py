"""Omniglot (Lake et al. 2015): 1623 handwritten characters x 20 drawings, 105x105 binary.

Reads the official ``images_background.zip`` (964 characters, 30 alphabets) and
``images_evaluation.zip`` (659 characters, 20 alphabets), or the same folders extracted, decodes
every drawing once to 28x28 (Lanczos) with ink = 255, and caches the result (about 25 MB) so
later loads take a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .common import (ENV_DATA, DataError, ImageClasses, cache_dir, data_root, decode_image, fingerprint,
                     from_lists, load_cached, open_zip, read_file, read_member, save_atomic)

SETS = ("images_background", "images_evaluation")
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
       "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
IMAGE_SIZE = 28
NUM_CHARACTERS = 1623
SPLITS = ("meta_train", "meta_val", "meta_test")


def _sources(root: Path) -> Dict[str, Path]:
    """{set: zip file or extracted folder} for both sets, or DataError."""
    found = {}
    for s in SETS:
        if (root / s).is_dir():
            found[s] = root / s
        elif (root / f"{s}.zip").is_file():
            found[s] = root / f"{s}.zip"
    missing = [s for s in SETS if s not in found]
    if missing:
        raise DataError(
            f"Omniglot not found in {root}: missing {', '.join(m + '.zip' for m in missing)} "
            f"(or the extracted folder). Put the official images_background.zip and "
            f"images_evaluation.zip there, point --data-dir / IMAML_DATA at the folder holding "
            f"them, or add --download to fetch them from {URL.format('<set>').rsplit('/', 1)[0]}")
    return found


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(root: Path, url_template: Optional[str] = None, timeout: float = 30.0) -> None:
    """Fetch the two official zips into ``root`` and verify their MD5 checksums."""
    url_template = url_template or URL
    root.mkdir(parents=True, exist_ok=True)
    for s in SETS:
        dest = root / f"{s}.zip"
        if dest.is_file():
            continue
        url, tmp = url_template.format(s), dest.with_suffix(".zip.part")
        print(f"downloading {url} ...", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                while block := resp.read(1 << 20):
                    fh.write(block)
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}); no network? "
                            f"Copy images_background.zip and images_evaluation.zip into {root} "
                            "by hand, or point --data-dir / IMAML_DATA at a folder holding them") from None
        got = _md5(tmp)
        if got != MD5[s]:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url} downloaded with MD5 {got}, expected {MD5[s]}; the file is "
                            "damaged or has changed: try again, or copy it by hand")
        os.replace(tmp, dest)


def _read_set(src: Path, set_name: str) -> Dict[str, List[torch.Tensor]]:
    """{'Alphabet/characterNN': [uint8 1x28x28, ...]} for one set, sorted by name."""
    per_class: Dict[str, List[torch.Tensor]] = {}
    if src.is_dir():
        files = sorted(p for p in src.rglob("*.png"))
        items = [(str(p.relative_to(src)), p) for p in files]
        read = lambda p, rel: read_file(p)  # noqa: E731
    else:
        zf = open_zip(src)
        items = sorted((m[len(set_name) + 1:], m) for m in zf.namelist()
                       if m.startswith(set_name + "/") and m.endswith(".png"))
        read = lambda m, rel: read_member(zf, m, src)  # noqa: E731
    if not items:
        raise DataError(f"{src} holds no PNG drawings under {set_name}/<Alphabet>/<character>/; "
                        "is it the official Omniglot archive?")
    for rel, handle in items:
        parts = rel.split("/")
        if len(parts) != 3:
            continue
        img = decode_image(read(handle, rel), f"{src}:{rel}", "L", IMAGE_SIZE)
        per_class.setdefault(f"{parts[0]}/{parts[1]}", []).append(255 - img)  # ink = 255
    return per_class


def load_omniglot(data_dir: Optional[str] = None, download_missing: bool = False,
                  use_cache: bool = True, progress=print):
    """All 1623 characters as ``(ImageClasses, {name: set})``.

    Args:
        data_dir: folder holding the two zips / folders, or a folder with an ``omniglot/``
            subfolder that does; defaults to $IMAML_DATA. When neither is given, the zips are
            kept in (and, the first time, downloaded into) ``<cache>/data/omniglot``.
        download_missing: fetch the official zips into a named folder when they are absent
            (off by default, so that a mistyped path is an error rather than a download).
    """
    if data_dir is None and not os.environ.get(ENV_DATA):
        # No folder named at all: use (and fill, if empty) a folder in the cache.
        root, download_missing = cache_dir() / "data" / "omniglot", True
    else:
        root = data_root(data_dir, "omniglot")
    try:
        sources = _sources(root)
    except DataError:
        if not download_missing:
            raise
        download(root)
        sources = _sources(root)
    key = fingerprint(list(sources.values())) + f"-{IMAGE_SIZE}"
    cache = cache_dir() / f"omniglot-{key}.pt"
    obj = load_cached(cache, key) if use_cache else None
    if obj is None:
        progress(f"decoding Omniglot from {root} (once; cached in {cache}) ...")
        per_class, sets = {}, {}
        for s, src in sources.items():
            part = _read_set(src, s)
            per_class.update(part)
            sets.update({n: s for n in part})
        classes = from_lists(per_class)
        obj = {"key": key, "images": classes.images, "offsets": classes.offsets,
               "names": classes.names, "sets": [sets[n] for n in classes.names]}
        if use_cache:
            save_atomic(obj, cache)
    classes = ImageClasses(obj["images"], obj["offsets"], list(obj["names"]))
    return classes, dict(zip(obj["names"], obj["sets"]))


def split_names(kind: str = "random") -> Dict[str, List[str]]:
    """The shipped, fixed split: {'meta_train', 'meta_val', 'meta_test': [character names]}.

    ``kind='random'``: 1200 characters for meta-training (1100 train + 100 held out for
    meta-validation) and 423 for meta-test, drawn once with seed 0 (see ``make_splits``).
    ``kind='alphabet'``: the background set (964 characters, 100 held out for validation)
    against the evaluation set (659), i.e. unseen alphabets at test time.
    """
    text = resources.files("imaml.data").joinpath("splits/omniglot.json").read_text()
    splits = json.loads(text)
    if kind not in splits["kinds"]:
        raise ValueError(f"unknown Omniglot split {kind!r}; choose one of {sorted(splits['kinds'])}")
    return splits["kinds"][kind]


def make_splits(names: List[str], sets: Dict[str, str], seed: int = 0, num_val: int = 100) -> dict:
    """How the shipped split file was made (kept for transparency; run by scripts only)."""
    import random
    names = sorted(names)
    rng = random.Random(seed)
    shuffled = names[:]
    rng.shuffle(shuffled)
    train = shuffled[:1200]
    background = [n for n in names if sets[n] == "images_background"]
    evaluation = [n for n in names if sets[n] == "images_evaluation"]
    bg = background[:]
    random.Random(seed + 1).shuffle(bg)
    return {"seed": seed, "kinds": {
        "random": {"meta_train": sorted(train[num_val:]), "meta_val": sorted(train[:num_val]),
                   "meta_test": sorted(shuffled[1200:])},
        "alphabet": {"meta_train": sorted(bg[num_val:]), "meta_val": sorted(bg[:num_val]),
                     "meta_test": sorted(evaluation)}}}


def rotate_classes(classes: ImageClasses) -> ImageClasses:
    """Each class four times, rotated by 0, 90, 180 and 270 degrees: new classes (MAML's
    augmentation). Names get a suffix ``@90`` etc."""
    images = torch.cat([torch.rot90(classes.images, k, dims=(2, 3)) for k in range(4)])
    n = len(classes.images)
    offsets = torch.cat([classes.offsets[:-1] + k * n for k in range(4)] +
                        [torch.tensor([4 * n], dtype=torch.int64)])
    names = [f"{c}@{90 * k}" for k in range(4) for c in classes.names]
    return ImageClasses(images, offsets, names)


def omniglot_split(split: str, data_dir: Optional[str] = None, kind: str = "random",
                   rotations: Optional[bool] = None, download_missing: bool = False,
                   progress=print) -> ImageClasses:
    """The characters of one split ('meta_train', 'meta_val' or 'meta_test').

    ``rotations`` (default: only for meta_train) multiplies the classes by four with the
    rotations of ``rotate_classes``; evaluation splits use the characters as drawn.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    classes, _ = load_omniglot(data_dir, download_missing=download_missing, progress=progress)
    part = classes.subset(split_names(kind)[split])
    if rotations if rotations is not None else split == "meta_train":
        part = rotate_classes(part)
    return part
