"""Meta-training (Algorithm 1) end to end: config, loop, validation, checkpoints, resume.

Reads top to bottom: build data and model from the config, then per iteration sample the
tasks of that iteration (a pure function of the seed and the iteration), take one outer step,
log; every ``val_every`` iterations evaluate on meta-validation and keep the best model; every
``checkpoint_every`` iterations write ``last.pt`` atomically. A run killed at any point and
resumed with ``--resume`` continues from ``last.pt`` and produces the same metrics as a run
that never stopped: the tasks depend only on (seed, iteration), and the checkpoint holds the
network, the optimizer, the random-number state and the number of tasks drawn.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .batched import supports_batching
from .distributed import (barrier, broadcast_parameters, from_rank0, init_from_env,
                          mean_meta_gradient)
from .checkpoint import (CheckpointError, METHOD_NAMES, build_method, build_network,
                         load_checkpoint, save_checkpoint)
from .evaluate import evaluate
from .functional import FunctionalModel
from .outer import apply_meta_gradient


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults: iMAML-GD on Omniglot 5-way 1-shot (paper, Table 2)."""

    # data
    dataset: str = "omniglot"
    data_dir: Optional[str] = None
    omniglot_split: str = "random"
    ways: int = 5
    shots: int = 1
    queries: int = 1            # query images per class in meta-training tasks
    eval_queries: int = 5       # ... and in validation / test tasks
    # method (see imaml.checkpoint.build_method)
    method: str = "imaml-gd"
    lam: float = 2.0
    inner_lr: float = 0.1
    inner_steps: int = 16
    inner_tol: float = 0.0      # δ: stop the inner solve at ‖∇G‖ ≤ lam·inner_tol
    inner_adaptive: bool = False  # accept/reject step sizing from inner_lr (imaml.inner)
    momentum: float = 0.9
    hf_steps: int = 5
    cg_iters: int = 5
    cg_max_iter: int = 5
    curvature: str = "hessian"  # iMAML's system: exact Hessian, or 'ggn' (Gauss-Newton)
    linear_solver: str = "cg"   # iMAML's linear solver: 'cg' or 'minres' (indefinite-safe)
    truncate: int = 5
    prox_lam: float = 0.0
    eval_inner_steps: Optional[int] = None  # inner steps at evaluation (default: inner_steps)
    # outer loop
    outer: str = "adam"
    outer_lr: float = 1e-3
    # 'constant'; 'cosine': outer_lr -> outer_lr_min over meta_iters; 'cosine-time': the same
    # cosine laid over max_minutes of training time, so a time-budgeted run ends its decay
    lr_schedule: str = "constant"
    outer_lr_min: float = 0.0
    meta_batch: int = 32
    meta_iters: int = 1000
    max_minutes: Optional[float] = None  # wall-clock budget of training (evaluation excluded)
    batching: str = "auto"   # 'vmap', 'loop', or 'auto': time both on the first iteration, keep the faster
    # evaluation, checkpoints, reproducibility
    val_every: int = 100
    val_tasks: int = 200
    test_tasks: int = 600
    checkpoint_every: int = 25
    seed: int = 0
    threads: Optional[int] = None

    def method_config(self, eval: bool = False) -> Dict[str, Any]:
        steps = self.eval_inner_steps if eval and self.eval_inner_steps else self.inner_steps
        return {"name": self.method, "lam": self.lam, "inner_lr": self.inner_lr,
                "inner_steps": steps, "inner_tol": self.inner_tol,
                "inner_adaptive": self.inner_adaptive, "momentum": self.momentum,
                "hf_steps": self.hf_steps, "cg_iters": self.cg_iters,
                "cg_max_iter": self.cg_max_iter, "curvature": self.curvature,
                "linear_solver": self.linear_solver,
                "truncate": self.truncate,
                "prox_lam": self.prox_lam}

    def validate(self) -> None:
        if self.dataset not in ("omniglot", "miniimagenet"):
            raise ValueError(f"dataset must be 'omniglot' or 'miniimagenet', got {self.dataset!r}")
        if self.method not in METHOD_NAMES:
            raise ValueError(f"method must be one of {METHOD_NAMES}, got {self.method!r}")
        if self.batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'loop', got {self.batching!r}")
        if self.outer not in ("adam", "sgd"):
            raise ValueError(f"outer must be 'adam' or 'sgd', got {self.outer!r}")
        for name in ("ways", "shots", "queries", "eval_queries", "meta_batch", "meta_iters",
                     "val_every", "val_tasks", "test_tasks", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if self.lr_schedule not in ("constant", "cosine", "cosine-time"):
            raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'cosine-time', "
                             f"got {self.lr_schedule!r}")
        if self.lr_schedule == "cosine-time" and not self.max_minutes:
            raise ValueError("lr_schedule 'cosine-time' is laid over max_minutes: set max_minutes")
        if not 0 <= self.outer_lr_min <= self.outer_lr:
            raise ValueError(f"outer_lr_min must lie in [0, outer_lr], got {self.outer_lr_min}")
        build_method(self.method_config())  # the method's own checks (lam > 0, ...)


def _field_types() -> Dict[str, Any]:
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    out = {}
    for f in dataclasses.fields(TrainConfig):
        t = str(f.type)
        base = t.replace("Optional[", "").rstrip("]")
        out[f.name] = (hints[base], t.startswith("Optional"))
    return out


def _coerce(name: str, value: Any, from_text: bool) -> Any:
    types = _field_types()
    if name not in types:
        close = [k for k in types if k.split("_")[0] == name.split("_")[0]]
        raise ValueError(f"unknown config field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; fields: {', '.join(sorted(types))}")
    typ, optional = types[name]
    if value is None or (from_text and value in ("null", "none", "None")):
        if optional:
            return None
        raise ValueError(f"config field {name!r} cannot be null")
    if from_text:
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return typ(value)
        except ValueError:
            raise ValueError(f"config field {name!r} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"config field {name!r} expects {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """A TrainConfig from a JSON file (any subset of fields) and ``key=value`` overrides."""
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a JSON object")
        for k, v in raw.items():
            if k.startswith("_"):  # comments
                continue
            values[k] = _coerce(k, v, from_text=False)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value")
        k, v = item.split("=", 1)
        values[k.strip()] = _coerce(k.strip(), v.strip(), from_text=True)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


# -- the run ----------------------------------------------------------------------------------

# grad_norm: of the meta-gradient (train rows); inner_grad_norm: mean ‖∇G(φ)‖ after the inner
# solve (train rows: over the tasks whose solver evaluated it; val rows: methods with λ > 0);
# inner_converged: fraction of the meta-batch whose inner solve met its tolerance;
# cg_residual: mean residual of iMAML's linear solve relative to its first;
# negative_curvature: tasks of the meta-batch whose linear solve met negative curvature
FIELDS = ["iteration", "split", "loss", "accuracy", "ci95", "grad_norm", "seconds",
          "inner_grad_norm", "inner_converged", "cg_residual", "negative_curvature"]


class _Metrics:
    """metrics.csv (and TensorBoard when installed), truncated to a checkpoint on resume."""

    def __init__(self, out: Path, keep_until: Optional[int]):
        self.path = out / "metrics.csv"
        rows = []
        if keep_until is not None and self.path.exists():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["iteration"]) <= keep_until]
        with open(self.path, "w", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            w.writeheader()
            w.writerows(rows)
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


def read_metrics(out) -> List[Dict[str, str]]:
    with open(Path(out) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def plot_curves(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(out)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
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
    plt.close(fig)
    return path


def _sampler(cfg: TrainConfig, split: str, queries: int, seed: int, progress):
    """The task sampler of one split of the config's dataset."""
    from .data import TaskSampler, load_split
    kw = {"kind": cfg.omniglot_split} if cfg.dataset == "omniglot" else {}
    classes = load_split(cfg.dataset, split, cfg.data_dir, progress=progress, **kw)
    return TaskSampler(classes, cfg.ways, cfg.shots, queries, seed=seed)


def _samplers(cfg: TrainConfig, progress):
    return (_sampler(cfg, "meta_train", cfg.queries, cfg.seed, progress),
            _sampler(cfg, "meta_val", cfg.eval_queries, cfg.seed + 1, progress))


def _choose_batching(method, model, sampler, indices, rank, world):
    """Time one meta-batch with vmap and with the loop, each warm (its second call: the first
    vmapped call pays a one-off cost that once made the slower loop win); all ranks adopt rank
    0's choice."""
    timings = {}
    for mode in ("vmap", "loop"):
        for _ in range(2):
            t0 = time.perf_counter()
            mean_meta_gradient(method, model, model.theta(), sampler, indices, mode == "vmap",
                               rank, world)
        timings[mode] = time.perf_counter() - t0
    vmap_wins = from_rank0(float(timings["vmap"] <= timings["loop"]), world) > 0.5
    return ("vmap" if vmap_wins else "loop"), timings


def outer_lr_at(cfg: TrainConfig, iteration: int, elapsed: float = 0.0) -> float:
    """The outer learning rate of iteration ``iteration`` (1-based): constant, or cosine from
    ``outer_lr`` at the first iteration to ``outer_lr_min`` at ``meta_iters`` ('cosine': a
    function of the iteration alone, so a resumed run follows the same schedule) or at
    ``max_minutes`` of training time ('cosine-time': a function of the ``elapsed`` training
    seconds before the iteration, which the checkpoint keeps; timings differ from run to run,
    so such a run is not bit-reproducible)."""
    if cfg.lr_schedule == "constant" or (cfg.lr_schedule == "cosine" and cfg.meta_iters == 1):
        return cfg.outer_lr
    if cfg.lr_schedule == "cosine-time":
        frac = min(1.0, elapsed / (60 * cfg.max_minutes))
    else:
        frac = (iteration - 1) / (cfg.meta_iters - 1)
    return cfg.outer_lr_min + 0.5 * (cfg.outer_lr - cfg.outer_lr_min) * (1 + math.cos(math.pi * frac))


def _ckpt_extra(cfg, iteration, opt, best, elapsed, batching):
    return {"config": dataclasses.asdict(cfg), "iteration": iteration, "batching": batching,
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
            "best_val": best, "elapsed": elapsed, "tasks_drawn": iteration * cfg.meta_batch}


def _cell(value) -> str:
    """A metrics.csv cell: empty for a figure the method does not produce (NaN)."""
    return "" if value != value else repr(value)


def _inner_text(stats: Dict[str, Any]) -> str:
    """What the progress line says of the inner and linear solves of the last meta-batch."""
    parts = []
    if stats["inner_grad_norm"] == stats["inner_grad_norm"]:
        parts.append(f"|grad G| {stats['inner_grad_norm']:.3g} "
                     f"({100 * stats['inner_converged']:.0f}% converged)")
    if stats["cg_residual"] == stats["cg_residual"]:
        parts.append(f"linear residual {stats['cg_residual']:.2g}, "
                     f"negative curvature {stats['negative_curvature']}")
    return "".join(f", {p}" for p in parts)


def _progress_line(cfg: TrainConfig, it: int, sec_per_it: float, elapsed: float, loss: float,
                   acc: float, best: float, stats: Optional[Dict[str, Any]] = None) -> str:
    left = (cfg.meta_iters - it) * sec_per_it
    if cfg.max_minutes is not None:
        left = min(left, max(0.0, 60 * cfg.max_minutes - elapsed))
    best_txt = f"{100 * best:.1f}%" if best >= 0 else "-"
    return (f"iteration {it}/{cfg.meta_iters} ({100 * it / cfg.meta_iters:.0f}%), {sec_per_it:.2f} s/it, "
            f"loss {loss:.3f}, acc {100 * acc:.1f}%, best val {best_txt}"
            f"{_inner_text(stats) if stats else ''}, "
            f"{elapsed / 60:.1f} min trained, about {left / 60:.0f} min left")


def train(cfg: TrainConfig, out_dir: str, resume: bool = False, progress: bool = True,
          log=print, progress_every_s: float = 60.0) -> Dict[str, Any]:
    """Run (or resume) meta-training; returns a summary (also in out_dir/train_summary.json).

    With ``progress``, a terminal gets a progress bar; output that is not a terminal (a log
    file, a batch job, a torchrun launch) gets a plain line every ``progress_every_s`` seconds.
    """
    from tqdm import tqdm
    rank, world = init_from_env()
    lead = rank == 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    last = out / "last.pt"
    if resume and not last.exists():
        raise CheckpointError(f"--resume: no checkpoint {last} to resume from")
    if not resume and last.exists() and lead:
        raise ValueError(f"{out} already holds a run (last.pt); use --resume to continue it or "
                         "choose another --out")
    torch.manual_seed(cfg.seed)
    net = build_network(cfg.dataset, cfg.ways)
    model = FunctionalModel(net)
    opt = (torch.optim.Adam(net.parameters(), lr=cfg.outer_lr) if cfg.outer == "adam"
           else torch.optim.SGD(net.parameters(), lr=cfg.outer_lr))
    start, best, elapsed = 0, -1.0, 0.0
    if resume:
        ck = load_checkpoint(last)
        saved = TrainConfig(**ck["config"])
        if dataclasses.asdict(saved) != dataclasses.asdict(cfg):
            diff = {k: (v, getattr(cfg, k)) for k, v in dataclasses.asdict(saved).items() if getattr(cfg, k) != v}
            changeable = {"meta_iters", "max_minutes", "threads", "data_dir", "batching"}
            if cfg.lr_schedule == "cosine":  # the schedule is laid over meta_iters
                changeable.discard("meta_iters")
            if cfg.lr_schedule == "cosine-time":  # ... or over max_minutes
                changeable.discard("max_minutes")
            if set(diff) - changeable:
                raise ValueError(f"--resume with a different config: {diff}; only "
                                 f"{sorted(changeable)} may change on resume")
        try:
            net.load_state_dict(ck["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{last} does not fit this network: {str(e)[:300]}") from None
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        start, best, elapsed = ck["iteration"], ck["best_val"], ck["elapsed"]
        if lead:
            log(f"resuming {out} at iteration {start}" + (f" on {world} processes" if world > 1 else ""))
    broadcast_parameters(net, world)
    if lead:
        with open(out / "config.json", "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=1)
    metrics = _Metrics(out, start if resume else None) if lead else None
    progress = progress and lead
    quiet = (lambda m: None) if not progress else log
    train_tasks, val_tasks = _samplers(cfg, quiet)
    method = build_method(cfg.method_config())
    eval_method = build_method(cfg.method_config(eval=True))
    batching = cfg.batching if supports_batching(method) else "loop"
    if batching == "auto" and resume:
        batching = ck.get("batching", "auto")  # the choice made when the run started
    meta = dict(dataset=cfg.dataset, ways=cfg.ways, shots=cfg.shots, queries=cfg.eval_queries,
                method=cfg.method_config(eval=True))

    def save(path, iteration):
        if lead:
            save_checkpoint(path, net, **meta,
                            **_ckpt_extra(cfg, iteration, opt, best, elapsed, batching))

    warned = False

    def validate(iteration):
        nonlocal best, warned
        res = evaluate(eval_method, model, model.theta(), val_tasks, cfg.val_tasks, progress=False)
        inner = "" if res.inner_grad_norm is None else repr(res.inner_grad_norm)
        met = "" if res.inner_converged is None else repr(res.inner_converged)
        metrics.log(iteration=iteration, split="val", accuracy=repr(res.mean), ci95=repr(res.ci95),
                    inner_grad_norm=inner, inner_converged=met)
        if res.mean > best:
            best = res.mean
            save(out / "best.pt", iteration)
        bar.write(f"iteration {iteration}: meta-val accuracy {res}")
        if res.inner_warning and not warned:  # once per run: the run goes on
            bar.write(f"iteration {iteration}: {res.inner_warning}")
            warned = True

    bar = tqdm(total=cfg.meta_iters, initial=start, desc=f"{cfg.method} {cfg.ways}-way {cfg.shots}-shot",
               disable=None if progress else True, dynamic_ncols=True)
    plain = progress and bar.disable  # no terminal: tqdm stays off, plain lines instead
    mark = (time.monotonic(), start, elapsed)  # when, iteration, training seconds of the last line
    it = start
    for it in range(start + 1, cfg.meta_iters + 1):
        trained = from_rank0(elapsed, world)  # rank 0's clock decides for every rank
        if cfg.max_minutes is not None and trained >= 60 * cfg.max_minutes:
            it -= 1
            if lead:
                bar.write(f"time budget of {cfg.max_minutes} min reached at iteration {it}")
                if it > start and it % cfg.val_every:  # the last model gets its validation too
                    validate(it)
            break
        t0 = time.perf_counter()
        indices = range((it - 1) * cfg.meta_batch, it * cfg.meta_batch)
        if batching == "auto":
            batching, timings = _choose_batching(method, model, train_tasks, indices, rank, world)
            if lead:
                bar.write(f"batching: vmap {timings['vmap']:.2f} s, loop {timings['loop']:.2f} s "
                          f"per meta-batch; using {batching}")
        g, stats = mean_meta_gradient(method, model, model.theta(), train_tasks, indices,
                                      batching == "vmap", rank, world)
        loss, acc = stats["loss"], stats["accuracy"]
        for group in opt.param_groups:
            group["lr"] = outer_lr_at(cfg, it, trained)
        apply_meta_gradient(model, opt, g)
        dt = time.perf_counter() - t0
        elapsed += dt
        if not lead:
            continue
        metrics.log(iteration=it, split="train", loss=repr(loss), accuracy=repr(acc),
                    grad_norm=repr(float(g.norm())), seconds=f"{dt:.4f}",
                    **{k: _cell(stats[k]) for k in ("inner_grad_norm", "inner_converged",
                                                    "cg_residual", "negative_curvature")})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}%",
                        best_val=f"{100 * best:.1f}%" if best >= 0 else "-")
        if plain and time.monotonic() - mark[0] >= progress_every_s:
            bar.write(_progress_line(cfg, it, (elapsed - mark[2]) / (it - mark[1]), elapsed,
                                     loss, acc, best, stats))
            mark = (time.monotonic(), it, elapsed)
        if it % cfg.val_every == 0 or it == cfg.meta_iters:
            validate(it)
        if it % cfg.checkpoint_every == 0:
            save(last, it)
    bar.close()
    barrier(world)
    if not lead:
        return {"iterations": it, "rank": rank}
    save(last, it)
    if not (out / "best.pt").exists():
        save(out / "best.pt", it)
    plot_curves(out)
    summary = {"iterations": it, "train_minutes": elapsed / 60, "best_val": best,
               "threads": torch.get_num_threads(), "processes": world}
    with open(out / "train_summary.json", "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def test_best(cfg: TrainConfig, out_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Evaluate ``best.pt`` (chosen on meta-validation) on ``test_tasks`` meta-test tasks."""
    from .checkpoint import MetaModel
    out = Path(out_dir)
    mm = MetaModel.load(out / "best.pt")
    sampler = _sampler(cfg, "meta_test", cfg.eval_queries, 0, lambda m: None)
    t0 = time.perf_counter()
    res = evaluate(mm.method, mm.model, mm.model.theta(), sampler, cfg.test_tasks, progress=progress)
    final = {"test_accuracy": res.mean, "test_ci95": res.ci95, "test_tasks": res.num_tasks,
             "best_iteration": mm.info["iteration"], "eval_seconds": time.perf_counter() - t0,
             "inner_grad_norm": res.inner_grad_norm, "inner_grew": res.inner_grew,
             "inner_converged": res.inner_converged}
    with open(out / "final.json", "w") as fh:
        json.dump(final, fh, indent=1)
    return {**final, "result": str(res), "inner_warning": res.inner_warning}
