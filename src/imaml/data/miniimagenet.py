"""Mini-ImageNet (Vinyals et al. 2016; the Ravi & Larochelle 2017 split): 100 classes, 84x84 RGB,
64 meta-train / 16 meta-val / 20 meta-test classes.

Two layouts are read:
- Ravi & Larochelle: ``images/`` (or ``images.zip`` holding ``images/<file>.jpg``) beside
  ``train.csv``, ``val.csv``, ``test.csv`` with rows ``filename,label``;
- the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
  ``image_data`` (uint8 [N, 84, 84, 3]) and ``class_dict`` ({class: [indices]}).
Each split is decoded once into a uint8 tensor and cached on disk. There is no official download
(the images are ImageNet's, for non-commercial research): the error says how to provide them.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .common import (DataError, ImageClasses, cache_dir, data_root, decode_image, fingerprint,
                     from_lists, load_cached, open_zip, permission_denied, read_file,
                     read_member, save_atomic)

SPLIT_FILES = {"meta_train": "train", "meta_val": "val", "meta_test": "test"}
EXPECTED_CLASSES = {"meta_train": 64, "meta_val": 16, "meta_test": 20}
IMAGE_SIZE = 84
HOW_TO = ("Mini-ImageNet has no official download: build it from ImageNet with the Ravi & "
          "Larochelle CSVs (images/ or images.zip + train.csv/val.csv/test.csv) or use the "
          "mini-imagenet-cache-{train,val,test}.pkl files, and point --data-dir / IMAML_DATA at "
          "the folder holding them (or at its parent with a miniimagenet/ subfolder)")


def _read_csv(path: Path) -> Dict[str, List[str]]:
    per_class: Dict[str, List[str]] = {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except PermissionError as e:
        raise permission_denied(path, e) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"could not read {path} ({e})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{path} does not start with the header 'filename,label' of the Ravi & "
                        "Larochelle split files")
    first_line: Dict[str, int] = {}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise DataError(f"{path}, line {i}: expected 'filename,label', got {row!r}")
        name = row[0].strip()
        if name in first_line:  # one image could be the support and the query of one task
            raise DataError(f"{path}, line {i}: {name} is listed again (first on line "
                            f"{first_line[name]}); each image must appear once: remove the "
                            "repeated rows")
        first_line[name] = i
        per_class.setdefault(row[1].strip(), []).append(name)
    if not per_class:
        raise DataError(f"{path} lists no images (only its header): the split file is "
                        "incomplete; copy it again")
    return per_class


def _from_csv(root: Path, split: str) -> ImageClasses:
    csv_path = root / f"{SPLIT_FILES[split]}.csv"
    per_class = _read_csv(csv_path)
    if (root / "images").is_dir():
        folder = root / "images"
        available = {p.name for p in folder.iterdir()}
        read = lambda name: read_file(folder / name)  # noqa: E731
        where = str(folder)
    else:
        zpath = root / "images.zip"
        zf = open_zip(zpath)
        members = {Path(m).name: m for m in zf.namelist() if not m.endswith("/")}
        available = set(members)
        read = lambda name: read_member(zf, members[name], zpath)  # noqa: E731
        where = str(zpath)
    missing = [f for files in per_class.values() for f in files if f not in available]
    if missing:
        raise DataError(f"{csv_path} names {len(missing)} images that are not in {where} "
                        f"(first: {missing[:3]}); the images are incomplete or the CSV belongs "
                        "to another copy")
    return from_lists({c: [decode_image(read(f), f"{where}/{f}", "RGB", IMAGE_SIZE) for f in files]
                       for c, files in per_class.items()})


def _from_pickle(path: Path) -> ImageClasses:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except PermissionError as e:
        raise permission_denied(path, e) from None
    except Exception as e:  # truncated pickles raise EOFError/UnpicklingError
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); it is "
                        "truncated or corrupt: copy it again") from None
    if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
        raise DataError(f"{path} is not a Mini-ImageNet cache: expected a dict with "
                        "'image_data' and 'class_dict'")
    data = np.asarray(obj["image_data"])
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        raise DataError(f"{path}: image_data must be uint8 [N, H, W, 3], got {data.dtype} {data.shape}")
    images = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2)
    per_class = {}
    for c, idx in obj["class_dict"].items():
        idx = torch.as_tensor(list(idx), dtype=torch.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
            raise DataError(f"{path}: class {c} indexes images outside image_data")
        per_class[str(c)] = list(images[idx].contiguous())
    return from_lists(per_class)


def load_miniimagenet(split: str, data_dir: Optional[str] = None, use_cache: bool = True,
                      progress=print) -> ImageClasses:
    """One split ('meta_train', 'meta_val', 'meta_test') as uint8 [N, 3, 84, 84] classes."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_FILES)}")
    root = data_root(data_dir, "miniimagenet")
    pkl = root / f"mini-imagenet-cache-{SPLIT_FILES[split]}.pkl"
    csv_path = root / f"{SPLIT_FILES[split]}.csv"
    has_images = (root / "images").is_dir() or (root / "images.zip").is_file()
    if csv_path.is_file() and has_images:
        sources, reader = [csv_path, root / ("images" if (root / "images").is_dir() else "images.zip")], "csv"
    elif pkl.is_file():
        sources, reader = [pkl], "pkl"
    else:
        raise DataError(f"Mini-ImageNet {split} not found in {root}: expected "
                        f"{csv_path.name} with images/ or images.zip, or {pkl.name}. {HOW_TO}")
    key = fingerprint(sources) + f"-{split}"
    cache = cache_dir() / f"miniimagenet-{key}.pt"
    obj = load_cached(cache, key) if use_cache else None
    if obj is None:
        progress(f"decoding Mini-ImageNet {split} from {root} (once; cached in {cache}) ...")
        classes = _from_csv(root, split) if reader == "csv" else _from_pickle(pkl)
        obj = {"key": key, "images": classes.images, "offsets": classes.offsets,
               "names": classes.names}
        if use_cache:
            save_atomic(obj, cache)
    return ImageClasses(obj["images"], obj["offsets"], list(obj["names"]))
