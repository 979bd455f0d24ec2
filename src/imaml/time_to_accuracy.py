"""Meta-validation accuracy against training wall time, from run records.

``imaml time-to-accuracy RUN [RUN ...] --out DIR`` reads each run folder's ``config.json`` and
``metrics.csv`` (or ``metrics.csv.gz``), puts every validation row at the training time spent
before it (the sum of the ``seconds`` of the train rows up to its iteration: validation and
testing excluded), draws the curves of all runs in one plot and writes a table of the minutes
each run needed to first reach each accuracy threshold (95, 97 and 98% by default).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .records import plt, write_json_atomic, write_text_atomic

THRESHOLDS = (0.95, 0.97, 0.98)


def _rows(run: Path) -> List[Dict[str, str]]:
    plain, packed = run / "metrics.csv", run / "metrics.csv.gz"
    path = plain if plain.is_file() else packed
    if not path.is_file():
        raise ValueError(f"{run} holds no metrics.csv or metrics.csv.gz")
    try:
        data = path.read_bytes()
        text = (gzip.decompress(data) if path is packed else data).decode()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or "
                         "corrupt: copy it again") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in ("iteration", "split", "accuracy", "seconds")
               if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path} is not the metrics of an imaml run: it lacks the column(s) "
                         f"{', '.join(missing)}")
    return list(reader)


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a number") from None


def curve(run) -> Dict:
    """A run's label, setting and validation curve [(training minutes, iteration, accuracy)]."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{run} holds no config.json: not a run folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    missing = [k for k in ("dataset", "ways", "shots", "method")
               if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{cfg_path} is not the config of an imaml run: it lacks "
                         f"{', '.join(missing)}")
    seconds, points = 0.0, []
    for i, r in enumerate(_rows(run), start=2):
        where = f"{run}/metrics.csv, row {i}"
        if r["split"] == "train" and r.get("seconds"):
            seconds += _number(r["seconds"], where)
        elif r["split"] == "val" and r.get("accuracy"):
            points.append((seconds / 60, int(_number(r["iteration"], where)),
                           _number(r["accuracy"], where)))
    if not points:
        raise ValueError(f"{run}'s metrics hold no validation rows: there is no accuracy to "
                         "time (a run validates every val_every iterations and at its end)")
    setting = f"{cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot"
    return {"run": str(run), "label": run.name, "method": cfg["method"], "setting": setting,
            "points": points, "train_minutes": seconds / 60}


def first_reach(points, threshold: float) -> Optional[float]:
    """Training minutes at the first validation at or above ``threshold`` (None: never)."""
    return next((m for m, _, acc in points if acc >= threshold), None)


def table(curves: List[Dict], thresholds: Sequence[float] = THRESHOLDS) -> str:
    head = ("| run | method | " + " | ".join(f"minutes to {100 * t:g}%" for t in thresholds)
            + " | best meta-val | training minutes |")
    lines = [head, "|---" * (4 + len(thresholds)) + "|"]
    for c in curves:
        cells = []
        for t in thresholds:
            m = first_reach(c["points"], t)
            cells.append("not reached" if m is None else f"{m:.1f}")
        best = max((acc for _, _, acc in c["points"]), default=float("nan"))
        lines.append(f"| {c['label']} | {c['method']} | " + " | ".join(cells)
                     + f" | {100 * best:.2f}% | {c['train_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def y_limits(curves: List[Dict], floor: float) -> Tuple[float, float]:
    """The plot's accuracy range (%): from ``floor`` (so that early low points do not squeeze
    the rest to a line), lower where needed to keep each run's best point 5 points above it."""
    accs = [100 * a for c in curves for _, _, a in c["points"]]
    lo, hi = min(accs, default=50), max(accs, default=100)
    floor = min([floor] + [100 * max(a for _, _, a in c["points"]) - 5
                           for c in curves if c["points"]])
    return max(lo, floor), min(100, hi + 5)


def plot(curves: List[Dict], path, floor: float = 80.0) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7.5, 4.5))
    for c in curves:
        ax.plot([m for m, _, _ in c["points"]], [100 * a for _, _, a in c["points"]], "o-", ms=2.5,
                label=f"{c['label']} ({c['method']})")
    ax.set_xlabel("training wall time (minutes; validation excluded)")
    ax.set_ylabel("meta-validation accuracy (%)")
    ax.set_ylim(*y_limits(curves, floor))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(", ".join(sorted({c["setting"] for c in curves})))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def run(runs: Sequence[str], out_dir: str, thresholds: Sequence[float] = THRESHOLDS) -> str:
    """Write time_to_accuracy.json/.md/.png into out_dir; returns the table. ``thresholds``
    are accuracies in (0, 1]; the plot shows from 15 points below the lowest of them, or lower
    where a run's best is below that."""
    curves = [curve(r) for r in runs]
    if len({c["setting"] for c in curves}) > 1:
        raise ValueError("the runs are of different settings: "
                         + ", ".join(sorted({c["setting"] for c in curves})))
    text = table(curves, thresholds)
    write_json_atomic({"curves": curves, "thresholds": list(thresholds)},
                      f"{out_dir}/time_to_accuracy.json")
    write_text_atomic(text, f"{out_dir}/time_to_accuracy.md")
    plot(curves, f"{out_dir}/time_to_accuracy.png", floor=100 * min(thresholds) - 15)
    return text
