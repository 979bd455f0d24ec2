"""Run records and result files.

Result files are written atomically (a temporary file beside the target, flushed, then a
rename), so a crash never leaves a half-written checkpoint, cache, JSON or table where a
complete one is expected, and a failed write leaves no temporary file behind. A training run's
metrics.csv (``MetricsLog``) and its curves (``plot_curves``) live here too."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional


def write_atomic(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temporary binary file beside ``path``, then rename it to
    ``path``; on any failure the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        # torch.save reports a full disk as a RuntimeError ("unexpected pos ...")
        if full or (not isinstance(e, OSError) and _free_bytes(path.parent) < 1 << 20):
            raise OSError(errno.ENOSPC, f"no space left on the disk to write {path} "
                          f"({_free_bytes(path.parent) >> 20} MiB free); free some space, then "
                          "run the command again") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _free_bytes(folder: Path) -> int:
    import shutil
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def write_text_atomic(text: str, path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(obj: Any, path) -> Path:
    """``json.dump`` of ``obj`` (indent 1) to ``path``, atomically."""
    return write_text_atomic(json.dumps(obj, indent=1) + "\n", path)


def torch_save_atomic(obj: Any, path) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    import torch
    return write_atomic(path, lambda fh: torch.save(obj, fh))


class RunLock:
    """An exclusive lock on a run folder for as long as a training writes into it (an ``flock``
    on ``.lock``, which holds the owner's process id; the system drops it when the process
    ends, however it ends). A second training into the same folder stops at once with a
    message naming the first, instead of interleaving their records."""

    def __init__(self, folder: Path):
        import fcntl
        self.path = Path(folder) / ".lock"
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            owner = self.fh.read().strip() or "unknown"
            self.fh.close()
            raise ValueError(f"{folder} is in use by another training (process {owner}); wait "
                             "for it to end or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()

    def release(self) -> None:
        if not self.fh.closed:
            self.fh.close()


def plt():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


# grad_norm: of the meta-gradient (train rows); inner_grad_norm: mean ‖∇G(φ)‖ after the inner
# solve (train rows: over the tasks whose solver evaluated it; val rows: methods with λ > 0);
# inner_converged: fraction of the meta-batch whose inner solve met its tolerance;
# cg_residual: mean residual of iMAML's linear solve relative to its first;
# negative_curvature: tasks of the meta-batch whose linear solve met negative curvature
FIELDS = ["iteration", "split", "loss", "accuracy", "ci95", "grad_norm", "seconds",
          "inner_grad_norm", "inner_converged", "cg_residual", "negative_curvature"]


class MetricsLog:
    """A run's metrics.csv (and TensorBoard when installed): rows are only ever appended while
    the run goes on. On resume the file is cut back to the checkpoint's iteration by writing
    the kept rows to a new file and renaming it over the old one, so a kill at any moment
    leaves either the old history or the new one, never a part; ``missing`` then counts the
    iterations up to the checkpoint that have no train row (0 for a whole history)."""

    def __init__(self, out: Path, keep_until: Optional[int]):
        self.path = out / "metrics.csv"
        rows: List[Dict[str, str]] = []
        if keep_until is not None and self.path.exists():
            rows = [r for r in _whole_rows(self.path) if int(r["iteration"]) <= keep_until]
        have = {int(r["iteration"]) for r in rows if r["split"] == "train"}
        self.missing = (keep_until or 0) - len(have & set(range(1, (keep_until or 0) + 1)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, FIELDS)
        w.writeheader()
        w.writerows({k: r.get(k) or "" for k in FIELDS} for r in rows)
        write_text_atomic(buf.getvalue(), self.path)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=(keep_until or 0) + 1)
        except Exception:  # tensorboard is optional
            pass

    def log(self, **row):
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
            fh.flush()
        if self.tb is not None:
            for k in ("loss", "accuracy"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(f"{row['split']}/{k}", float(row[k]), row["iteration"])


def cell(value) -> str:
    """A metrics.csv cell: empty for a figure the method does not produce (NaN or None)."""
    return "" if value is None or value != value else repr(value)


def _whole_rows(path: Path) -> List[Dict[str, str]]:
    """The rows of a metrics.csv, less a last row cut short by a crash mid-write."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for r in rows if r.get("split") in ("train", "val")
            and (r.get("iteration") or "").isdigit() and None not in r.values()]


def read_metrics(out) -> List[Dict[str, str]]:
    """The rows of a run folder's metrics.csv."""
    return _whole_rows(Path(out) / "metrics.csv")


def plot_curves(out: Path) -> Path:
    """curves.png of a run folder: query loss and accuracy of the train rows (a running mean
    for long runs) and the validation accuracies, against the iteration."""
    pyplot = plt()
    rows = read_metrics(out)
    fig, (a1, a2) = pyplot.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        it = [int(r["iteration"]) for r in rs]
        loss = [float(r["loss"]) if r["loss"] else float("nan") for r in rs]
        acc = [100 * float(r["accuracy"]) for r in rs]
        if split == "train" and len(rs) > 20:  # running mean over 1/20 of the run
            k = max(1, len(rs) // 20)
            loss = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
            acc = [sum(acc[max(0, i - k):i + 1]) / len(acc[max(0, i - k):i + 1]) for i in range(len(acc))]
        if split == "train":
            a1.plot(it, loss, style, ms=3, label=split)
        a2.plot(it, acc, style, ms=3, label=split)
    a1.set_ylabel("query loss")
    a2.set_ylabel("query accuracy (%)")
    for a in (a1, a2):
        a.set_xlabel("meta-iteration")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return path
