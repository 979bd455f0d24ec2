"""What the dataset loaders share: errors, the in-memory image store, paths and the disk cache."""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..records import torch_save_atomic

ENV_DATA = "IMAML_DATA"
ENV_CACHE = "IMAML_CACHE"


class DataError(RuntimeError):
    """A dataset could not be found, read or used; the message names the problem and the fix."""


def permission_denied(path, e: OSError, fix: str = "") -> DataError:
    """The error for a dataset file or folder this user may not read or write: what, where, and
    what to do (not "corrupt, download again": the bytes may be fine)."""
    fix = fix or ("make it readable (chmod a+r) or point --data-dir / IMAML_DATA at a copy you "
                  "can read")
    return DataError(f"{e.filename or path}: permission denied ({e.strerror}); {fix}")


def read_file(path: Path) -> bytes:
    """A source file's bytes, with an unreadable file named as such."""
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise permission_denied(path, e) from None


@dataclass
class ImageClasses:
    """Images grouped by class, kept in memory as one compact uint8 tensor.

    Attributes:
        images: uint8 [num_images, C, H, W]; the images of class c are
            ``images[offsets[c]:offsets[c + 1]]``.
        offsets: int64 [num_classes + 1].
        names: one name per class.
    """

    images: Tensor
    offsets: Tensor
    names: List[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        if len(self.offsets) != len(self.names) + 1 or int(self.offsets[-1]) != len(self.images):
            raise ValueError("offsets must have one entry per class plus one, ending at len(images)")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def counts(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def subset(self, names: Sequence[str]) -> "ImageClasses":
        """The classes named, in the order given (a missing name is an error)."""
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise DataError(f"{len(missing)} classes of the split are not in the data "
                            f"(first: {missing[:3]}); is the dataset complete?")
        ids = [index[n] for n in names]
        parts = [self.images[self.offsets[i]:self.offsets[i + 1]] for i in ids]
        counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return ImageClasses(torch.cat(parts) if parts else self.images[:0], offsets, list(names))


def from_lists(per_class: Dict[str, List[Tensor]]) -> ImageClasses:
    """Build an ``ImageClasses`` from {class name: [uint8 image tensors [C, H, W]]}."""
    names = list(per_class)
    counts = torch.tensor([len(per_class[n]) for n in names], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    images = torch.stack([im for n in names for im in per_class[n]])
    return ImageClasses(images, offsets, names)


def data_root(data_dir: Optional[str], name: str) -> Path:
    """The folder holding dataset ``name``: ``data_dir`` (or $IMAML_DATA) or its subfolder
    ``name`` when that exists. Raises DataError when neither is given."""
    base = data_dir or os.environ.get(ENV_DATA)
    if not base:
        raise DataError(f"no data directory given for {name}: pass --data-dir DIR or set "
                        f"{ENV_DATA}=DIR (DIR holding {name}/ or its files)")
    base = Path(base).expanduser()
    if base.exists() and not base.is_dir():
        raise DataError(f"data directory {base} is a file, not a folder (from --data-dir or "
                        f"{ENV_DATA}): name the folder that holds {name}/ or its files")
    if not base.is_dir():
        raise DataError(f"data directory {base} does not exist (from --data-dir or {ENV_DATA})")
    return base / name if (base / name).is_dir() else base


def cache_dir() -> Path:
    """Where decoded datasets are cached: $IMAML_CACHE, else ~/.cache/imaml."""
    d = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "imaml")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise permission_denied(d, e, f"the decoded-data cache needs a folder you can write: "
                                      f"set {ENV_CACHE} to one") from None
    return d


def fingerprint(paths: Sequence[Path]) -> str:
    """A key that changes when any source changes: for a file its name, size and modification
    time; for a folder the same of every file inside it (an image replaced in an extracted
    folder changes the key, though the folder's own time does not change)."""
    h = hashlib.sha1()
    for p in sorted(paths):
        files = [p] if not p.is_dir() else sorted(f for f in p.rglob("*") if f.is_file())
        h.update(str(p.resolve()).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if f != p else ''}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _digest(obj: dict) -> str:
    """A checksum of a cache's contents (every tensor's bytes and every other value)."""
    h = hashlib.sha1()
    for k in sorted(obj):
        if k == "digest":
            continue
        v = obj[k]
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes() if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.hexdigest()


def load_cached(path: Path, key: str) -> Optional[dict]:
    """The cached object at ``path`` if it exists, loads, carries ``key`` and its contents
    match the checksum written with it; else None (the caller rebuilds it: a damaged or stale
    cache is never trusted)."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(obj, dict) or obj.get("key") != key or obj.get("digest") != _digest(obj):
        return None
    return obj


# the header of a decoded-dataset file: ``imaml cache prune`` deletes only files that carry it
CACHE_FORMAT = "imaml-cache"
CACHE_PREFIXES = ("omniglot", "miniimagenet")


def save_atomic(obj, path: Path) -> None:
    """torch.save with a checksum of the contents and the cache's header (``CACHE_FORMAT``), to
    a temporary file, then rename: a crash never leaves half a file, and bytes changed later
    are detected by ``load_cached``."""
    obj = {**obj, "format": CACHE_FORMAT}
    torch_save_atomic({**obj, "digest": _digest(obj)}, path)


def is_cache_file(path: Path) -> bool:
    """Whether ``path`` is a decoded dataset this cache wrote: a torch file named
    ``<dataset>-<key>.pt`` that holds that key, a checksum and the cache's header (files
    written before the header existed: the key and the checksum, and no other format). Read
    memory-mapped: the images are not loaded. A checkpoint (format 'imaml-checkpoint') or any
    other file is never one."""
    if path.suffix != ".pt" or not path.is_file():
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str) \
            or not isinstance(obj.get("digest"), str):
        return False
    if obj.get("format", CACHE_FORMAT) != CACHE_FORMAT:
        return False
    return path.name in {f"{prefix}-{obj['key']}.pt" for prefix in CACHE_PREFIXES}


def cache_files(folder: Optional[Path] = None) -> tuple:
    """(decoded datasets this cache wrote, newest first; every other file in the folder, which
    the cache never deletes)."""
    folder = folder or cache_dir()
    ours, others = [], []
    for p in sorted(folder.iterdir()):
        (ours if is_cache_file(p) else others).append(p)
    return sorted(ours, key=lambda p: p.stat().st_mtime, reverse=True), others


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except PermissionError as e:
        raise permission_denied(path, e) from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable zip file ({e}); it is probably truncated or "
                        "corrupt: delete it and download or copy it again") from None


def read_member(zf: zipfile.ZipFile, member: str, archive: Path) -> bytes:
    try:
        return zf.read(member)
    except Exception as e:  # BadZipFile (bad CRC), zlib.error, EOFError on truncated data
        raise DataError(f"{archive} is corrupt: could not read {member} ({e}); delete it and "
                        "download or copy it again") from None


def decode_image(data: bytes, what: str, mode: str, size: Optional[int]) -> Tensor:
    """Decode image bytes to uint8 [C, H, W] in PIL ``mode`` ('L' or 'RGB'), resized to
    size x size when given (Lanczos)."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{what} is not a readable image ({e}); the file is corrupt: replace it "
                        "or download the dataset again") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
