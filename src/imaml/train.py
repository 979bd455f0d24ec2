"""Meta-training (Algorithm 1) end to end: the loop, validation, checkpoints, resume.

Reads top to bottom: build data and model from the config (``imaml.config``), then per
iteration sample the tasks of that iteration (a pure function of the seed and the iteration),
take one outer step, log (``imaml.records``); every ``val_every`` iterations evaluate on
meta-validation and keep the best model; every ``checkpoint_every`` iterations write
``last.pt`` atomically. A run killed at any point and resumed with ``--resume`` continues from
``last.pt`` and produces the same metrics as a run that never stopped: the tasks depend only on
(seed, iteration), and the checkpoint holds the network, the optimizer, the random-number state
and the number of tasks drawn.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config, outer_lr_at  # noqa: F401 (re-exported)
from .distributed import (barrier, broadcast_parameters, from_rank0,
                          init_from_env, mean_meta_gradient, resolve_device)
from .evaluate import evaluate
from .functional import FunctionalModel, NonFiniteError
from .outer import LearnedLam, OuterState, outer_update
from .records import (MetricsLog, RunLock, cell, plot_curves,  # noqa: F401 (re-exported)
                      read_metrics, write_json_atomic)
from .registry import adapt_names, build_method, build_network

# a run whose training loss or meta-parameter norm passes this many times its first value has
# diverged (a 2-hour Omniglot run grew the norm 4x, 18.6 -> 71.7; the cases: losses of
# 1e13-1e21, weights near 1e15); training stops there. The first iteration's loss is held to
# DIVERGED times the loss of chance, log(ways) (issue 24: MAML with inner_lr 1e6 began at 1e22)
DIVERGED = 100.0
# past this many times its yardstick a run is suspect: last.pt is not written over, so that
# the checkpoint a diverged run leaves is one taken before the blow-up began. The yardsticks:
# the first training loss, and the parameter norm at the last checkpoint written (growth since
# the last checkpoint, a few dozen iterations: a long run may grow its norm 10x legitimately)
SUSPECT = 10.0
# a meta-gradient exactly 0 in the first iteration, or this many iterations in a row, trains
# nothing (Reptile with inner_lr 1e4: every adaptive inner step rejected, φ = θ)
ZERO_STREAK = 10

# the records of a run folder: any of them makes a new run into the folder refuse (a
# metrics.csv without a row, left by a run that failed before its first iteration, is none)
RECORDS = ("last.pt", "best.pt", "metrics.csv", "metrics.csv.gz", "final.json",
           "train_summary.json", "curves.png")

# figures of the inner and linear solves logged with every train row
SOLVE_STATS = ("inner_grad_norm", "inner_converged", "cg_residual", "negative_curvature")


def task_sampler(cfg: TrainConfig, split: str, queries: int, seed: int, progress=None,
                 shots: Optional[int] = None):
    """The task sampler of one split of the config's dataset (training and validation use
    seeds ``cfg.seed`` and ``cfg.seed + 1``, the final test seed 0), with ``shots`` support
    images per class (default ``cfg.shots``)."""
    from .data import TaskSampler, load_split
    kw = {"kind": cfg.omniglot_split} if cfg.dataset == "omniglot" else {}
    classes = load_split(cfg.dataset, split, cfg.data_dir, progress=progress or (lambda m: None),
                         **kw)
    return TaskSampler(classes, cfg.ways, shots or cfg.shots, queries, seed=seed)


def _samplers(cfg: TrainConfig, progress):
    return (task_sampler(cfg, "meta_train", cfg.queries, cfg.seed, progress, cfg.train_shots),
            task_sampler(cfg, "meta_val", cfg.eval_queries, cfg.seed + 1, progress))


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


class _Run:
    """One run of meta-training: its state, and the steps ``train`` drives in order."""

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: bool, progress: bool, log,
                 network: Optional[torch.nn.Module], samplers, allow_change=()):
        self.cfg, self.out, self.log = cfg, Path(out_dir), log
        self.allow_change = tuple(allow_change)
        self.device = resolve_device(cfg.device)
        self.rank, self.world = init_from_env(self.device)
        self.lead = self.rank == 0
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"the run folder {self.out} is a file; give --out a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.lock = RunLock(self.out) if self.lead else None
        try:
            self._setup(resume, progress, network, samplers)
        except BaseException:
            self.release()
            raise

    def _setup(self, resume: bool, progress: bool, network, samplers) -> None:
        cfg, log = self.cfg, self.log
        self.last = self.out / "last.pt"
        if resume and not self.last.exists():
            raise CheckpointError(f"--resume: no checkpoint {self.last} to resume from")
        found = [r for r in RECORDS if (self.out / r).exists()
                 and (r != "metrics.csv" or read_metrics(self.out))]
        if not resume and found:  # every rank refuses (read before rank 0 writes anything)
            raise ValueError(
                f"{self.out} already holds the records of a run ({', '.join(found)}); a new "
                "run would overwrite them: "
                + ("continue it with --resume, " if "last.pt" in found else
                   "it cannot be resumed (no last.pt), ")
                + "choose another --out, or delete those files to start afresh")
        torch.manual_seed(cfg.seed)
        net = network if network is not None else build_network(cfg.dataset, cfg.ways)
        self.net = net.to(self.device)
        self.model = FunctionalModel(self.net, adapt=adapt_names(cfg.method_config()))
        self.opt = (torch.optim.Adam(self.net.parameters(), lr=cfg.outer_lr) if cfg.outer == "adam"
                    else torch.optim.SGD(self.net.parameters(), lr=cfg.outer_lr))
        self.start, self.best, self.elapsed = 0, -1.0, 0.0
        self.reference: Dict[str, float] = {}  # first loss and parameter norm (_check_finite)
        self.suspect: Optional[str] = None  # why last.pt is not written over now (SUSPECT)
        self.said_suspect = False
        self.zero_streak = 0  # iterations in a row with a meta-gradient exactly 0
        ck = self._resume() if resume else {}
        broadcast_parameters(self.net, self.world)
        if self.lead:
            fields = dataclasses.asdict(cfg)
            write_json_atomic({**fields, CONFIG_DIGEST: _config_digest(fields)},
                              self.out / "config.json")
        self.metrics = MetricsLog(self.out, self.start if resume else None) if self.lead else None
        if self.metrics is not None and self.metrics.missing:
            log(f"warning: {self.out / 'metrics.csv'} lacks the train rows of "
                f"{self.metrics.missing} of the {self.start} iterations before the checkpoint "
                "(the file was cut or replaced outside imaml); the run goes on, its history "
                "has that gap")
        self.progress = progress and self.lead
        quiet = log if self.progress else (lambda m: None)
        self.train_tasks, self.val_tasks = samplers if samplers is not None else _samplers(cfg, quiet)
        self.method = build_method(cfg.method_config())
        self.eval_method = build_method(cfg.method_config(eval=True))
        self.lam = None  # the learned λ (config learn_lam)
        if cfg.learn_lam:
            self.lam = LearnedLam(self.model, cfg.lam, cfg.lam_lr, self.device,
                                  ck.get("learned_lam_state"))
        moments = ck.get("inner_moments")  # Adam's carried moments (config inner_carry)
        self.state = OuterState(None if self.lam is None else self.lam.per_parameter(),
                                None if moments is None else moments.to(self.device),
                                ck.get("inner_t", 0))
        batching = cfg.batching
        if batching == "auto" and resume:
            batching = ck.get("batching", "auto")  # the choice made when the run started
        self.batching, self.warned = batching, False

    def _resume(self) -> Dict[str, Any]:
        """Load last.pt into the network, the optimizer and the random-number state."""
        ck = load_checkpoint(self.last)
        lacking = [k for k in ("config", "iteration", "optimizer", "rng", "best_val", "elapsed")
                   if k not in ck]
        if lacking:
            raise CheckpointError(f"{self.last} lacks {', '.join(lacking)}: it is not a training "
                                  "checkpoint (imaml train writes last.pt itself); it cannot be "
                                  "resumed")
        saved = TrainConfig(**ck["config"])
        own = self.out / "config.json"
        _check_config_file(own, saved, self.cfg)  # every rank: none waits on a refused one
        try:
            _check_resume_config(saved, self.cfg, self.allow_change)
        except ValueError as e:
            raise ValueError(f"{e}. The run's own config is {own}: resume with it (imaml train "
                             f"{own} --out {self.out} --resume, or no config at all), adding "
                             "field=value only for what may change") from None
        if ck["iteration"] > self.cfg.meta_iters:
            raise ValueError(f"{self.last} is at iteration {ck['iteration']}, past meta_iters="
                             f"{self.cfg.meta_iters}: nothing would be trained; to train on, "
                             f"give meta_iters above {ck['iteration']}; to test the run, "
                             f"imaml eval {self.out / 'best.pt'}")
        try:
            self.net.load_state_dict(ck["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(f"{self.last} does not fit this network: {str(e)[:300]}") from None
        self.opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        self.start, self.best, self.elapsed = ck["iteration"], ck["best_val"], ck["elapsed"]
        self.reference = dict(ck.get("reference") or {})
        if self.lead:
            self.log(f"resuming {self.out} at iteration {self.start}"
                     + (f" on {self.world} processes" if self.world > 1 else ""))
            if self.start == self.cfg.meta_iters:
                self.log(f"{self.last} is already at meta_iters={self.start}: nothing is left "
                         "to train; the run's records are finished (and, from the command "
                         "line, the final test run) again")
        if not (self.out / "best.pt").exists() and self.best >= 0:
            if self.lead:
                self.log(f"warning: {self.out / 'best.pt'} is missing: the best model validated "
                         f"before iteration {self.start} ({100 * self.best:.2f}%) cannot be "
                         "restored; best.pt will hold the best model validated from here on "
                         "(the last one included), and 'best' refers to those only")
            self.best = -1.0
        return ck

    def _kept(self, rate: str) -> str:
        """What the divergence message says of last.pt."""
        if not self.last.exists():
            return ""
        kept = load_checkpoint(self.last)["iteration"]
        return (f". last.pt still holds iteration {kept}, which --resume continues with a lower "
                f"rate given with --allow-change {rate} (it was taken while the loss and the "
                f"norm were under {SUSPECT:g} times their yardsticks)")

    def _check_meta_gradient(self, iteration: int, g: torch.Tensor, loss: float) -> None:
        """Stop before a meta-gradient that cannot train is applied: not finite (or a norm
        that overflows), a first iteration whose loss is past DIVERGED times chance (the inner
        loop diverged; the outer yardsticks would be taken from it), or a meta-gradient
        exactly 0 in the first iteration or ZERO_STREAK in a row (θ never moves)."""
        gnorm = float(torch.linalg.vector_norm(g))
        chance = math.log(max(self.cfg.ways, 2))
        inner = (f"lower inner_lr ({self.cfg.inner_lr:g})"
                 + ("" if self.cfg.inner_adaptive else " or set inner_adaptive=true")
                 + (", or raise lam" if self.cfg.method.startswith("imaml") else ""))
        what = None
        if not math.isfinite(gnorm) or not math.isfinite(loss):
            what = (f"the meta-gradient of iteration {iteration} is not finite (norm {gnorm:.3g}, "
                    f"training loss {loss:.3g})")
        elif iteration == 1 and loss > DIVERGED * chance:
            what = (f"the training loss of iteration 1 is {loss:.3g}, {loss / chance:.3g} times "
                    f"the loss of chance (log {self.cfg.ways} = {chance:.3g})")
        if what is not None:
            raise NonFiniteError(f"the run diverged: {what}: the inner loop (or the linear "
                                 f"solve) blew up: {inner}" + self._kept("inner_lr"))
        self.zero_streak = self.zero_streak + 1 if gnorm == 0 else 0
        if gnorm == 0 and (iteration == 1 or self.zero_streak >= ZERO_STREAK):
            span = (f"iteration {iteration}" if self.zero_streak == 1 else
                    f"iterations {iteration - self.zero_streak + 1}-{iteration}")
            raise ValueError(
                f"the meta-gradient is exactly 0 in {span}: θ does not move and the run trains "
                "nothing. The inner loop left every task where it started (with "
                "inner_adaptive, every trial step was rejected: the step is far too long): "
                f"{inner}")

    def _check_finite(self, iteration: int, loss: float) -> None:
        """Stop before a diverged model can be validated or written over a good checkpoint: the
        meta-parameters non-finite, their norm grown past DIVERGED times its start, or the
        training loss past DIVERGED times its first value. Past SUSPECT times, the run is
        suspect: ``checkpoint`` does not write last.pt over until it is not."""
        norm = float(torch.linalg.vector_norm(self.model.theta()))
        ref = self.reference
        ratios = {"norm": norm / max(ref.get("checkpoint_norm", ref["param_norm"]), 1e-6),
                  "loss": loss / max(ref["loss"], 1e-3)}
        what = None
        if not math.isfinite(norm):
            what = "made the meta-parameters non-finite"
        elif norm > DIVERGED * max(ref["param_norm"], 1e-6):
            what = (f"grew the meta-parameters' norm to {norm:.3g} ({norm / ref['param_norm']:.3g} "
                    "times its start)")
        elif ratios["loss"] > DIVERGED:
            what = f"left a training loss of {loss:.3g} ({loss / ref['loss']:.3g} times its first)"
        if what is None:
            worst = max(ratios, key=ratios.get)
            what = "meta-parameters' norm" if worst == "norm" else "training loss"
            yardstick = "at the last checkpoint" if worst == "norm" else "in the first iteration"
            self.suspect = (f"iteration {iteration}: the {what} is {ratios[worst]:.3g} times "
                            f"what it was {yardstick}" if ratios[worst] > SUSPECT else None)
            return
        raise NonFiniteError(
            f"the run diverged: the outer step of iteration {iteration} {what}: the outer "
            f"learning rate ({self.opt.param_groups[0]['lr']:.3g}) is too large for this "
            "meta-gradient; lower outer_lr (or use Adam)" + self._kept("outer_lr"))

    def checkpoint(self, iteration: int, write) -> None:
        """last.pt, unless the run is suspect (SUSPECT): then the last one taken stays."""
        if self.suspect is None:
            # the yardstick of the norm (saved in the checkpoint: a resume decides alike)
            self.reference["checkpoint_norm"] = float(torch.linalg.vector_norm(self.model.theta()))
            self.save(self.last, iteration)
            self.said_suspect = False
        elif self.lead and not self.said_suspect:  # once per suspect stretch
            write(f"{self.suspect}: a sign of divergence; last.pt is not written over while "
                  "it lasts (it keeps the last checkpoint taken before)")
            self.said_suspect = True

    def save(self, path: Path, iteration: int) -> None:
        if not self.lead:
            return
        cfg = self.cfg
        save_checkpoint(path, self.net, dataset=cfg.dataset, ways=cfg.ways, shots=cfg.shots,
                        queries=cfg.eval_queries, method=cfg.method_config(eval=True),
                        config=dataclasses.asdict(cfg), iteration=iteration,
                        batching=self.batching, optimizer=self.opt.state_dict(),
                        rng=torch.get_rng_state(), best_val=self.best, elapsed=self.elapsed,
                        tasks_drawn=iteration * cfg.meta_batch, reference=self.reference,
                        **({"learned_lam": list(self.lam.values().values()),
                            "learned_lam_state": self.lam.state()} if self.lam else {}),
                        **({"inner_moments": self.state.moments.detach().cpu(),
                            "inner_t": self.state.inner_t}
                           if self.state.moments is not None else {}))

    def validate(self, iteration: int, write) -> None:
        """Meta-validation of the current model; best.pt when it is the best so far."""
        # (adaptation from the learned λ and the carried moments too)
        res = evaluate(self.state.apply(self.eval_method), self.model, self.model.theta(),
                       self.val_tasks, self.cfg.val_tasks, progress=False)
        self.metrics.log(iteration=iteration, split="val", accuracy=repr(res.mean),
                         ci95=repr(res.ci95), inner_grad_norm=cell(res.inner_grad_norm),
                         inner_converged=cell(res.inner_converged))
        if res.mean > self.best:
            self.best = res.mean
            self.save(self.out / "best.pt", iteration)
        write(f"iteration {iteration}: meta-val accuracy {res}")
        if self.lam is not None:
            write(f"iteration {iteration}: λ per parameter tensor "
                  + " ".join(f"{v:.3g}" for v in self.lam.values().values()))
        if res.inner_warning and not self.warned:  # once per run: the run goes on
            write(f"iteration {iteration}: {res.inner_warning}")
            self.warned = True

    def step(self, it: int, trained: float, write):
        """One outer step (Algorithm 1) on the tasks of iteration ``it``: (g, stats, seconds)."""
        t0 = time.perf_counter()
        indices = range((it - 1) * self.cfg.meta_batch, it * self.cfg.meta_batch)
        method = self.state.apply(self.method)
        if self.batching == "auto":
            self.batching, timings = _choose_batching(method, self.model, self.train_tasks,
                                                      indices, self.rank, self.world)
            if self.lead:
                write(f"batching: vmap {timings['vmap']:.2f} s, loop {timings['loop']:.2f} s "
                      f"per meta-batch; using {self.batching}")
        means, stats = mean_meta_gradient(method, self.model, self.model.theta(),
                                          self.train_tasks, indices, self.batching == "vmap",
                                          self.rank, self.world)
        for group in self.opt.param_groups:
            group["lr"] = outer_lr_at(self.cfg, it, trained)
        g = means["grad"]
        if not self.reference:  # the first iteration of a run: yardsticks from θ before its step
            self.reference.update(loss=stats["loss"], param_norm=float(
                torch.linalg.vector_norm(self.model.theta())))
        self._check_meta_gradient(it, g, stats["loss"])
        self.state = outer_update(self.model, self.opt, means, self.state, self.lam,
                                  method.inner.steps)
        self._check_finite(it, stats["loss"])
        dt = time.perf_counter() - t0
        self.elapsed += dt
        return g, stats, dt

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def finish(self, it: int) -> Dict[str, Any]:
        """The last checkpoint, curves.png and train_summary.json (rank 0)."""
        self.save(self.last, it)
        if not (self.out / "best.pt").exists():  # best.pt lost and no validation since: the
            self.best = -1.0                     # last model is validated, and so the best
            self.validate(it, self.log)
        plot_curves(self.out)
        summary = {"iterations": it, "train_minutes": self.elapsed / 60, "best_val": self.best,
                   "threads": torch.get_num_threads(), "processes": self.world}
        if self.lam is not None:
            summary["learned_lam"] = self.lam.values()
        write_json_atomic(summary, self.out / "train_summary.json")
        return summary


# what --allow-change may change on resume, at the user's explicit request (after divergence)
RATES = ("outer_lr", "outer_lr_min", "inner_lr", "lam_lr")


# config.json carries a digest of its fields (a comment field, which load_config skips): a file
# whose fields still match it is as the run wrote it; any other has been edited
CONFIG_DIGEST = "_digest_of_the_fields_as_written"


def _config_digest(fields: Dict[str, Any]) -> str:
    import hashlib
    import json
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _check_config_file(path: Path, saved: TrainConfig, cfg: TrainConfig) -> None:
    """A resume rewrites the run's config.json: refuse when the file was edited (its digest does
    not match) and holds a value neither last.pt's config nor the resumed config has, an edit
    that the resume would silently drop."""
    if not path.is_file():
        return
    import json
    try:
        held = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read as JSON ({e}); it was edited or damaged: "
                         "repair it, or delete it (the resume writes it anew)") from None
    if not isinstance(held, dict):
        raise ValueError(f"{path} does not hold a JSON object: repair it or delete it")
    digest = held.pop(CONFIG_DIGEST, None)
    if digest == _config_digest(held):  # as a run wrote it (perhaps a resume that then stopped)
        return
    environment = {"data_dir", "device", "threads", "batching"}
    old, new = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    edits = {k: v for k, v in held.items() if k not in environment and not k.startswith("_")
             and (k not in new or (v != old[k] and v != new[k]))}
    if edits:
        raise ValueError(
            f"{path} was edited after the run wrote it ("
            + ", ".join(f"{k}: {v!r} in the file, {new.get(k)!r} in this resume" for k, v in
                        edits.items())
            + "); this resume would ignore the edit and write over it: resume with the file "
            f"(imaml train {path} --out {path.parent} --resume) or put back what it held")


def _check_resume_config(saved: TrainConfig, cfg: TrainConfig, allow=()) -> None:
    """A resumed run may change only what does not change its results, and the rates named in
    ``allow`` (a deliberate change, for a run that diverged)."""
    bad = sorted(set(allow) - set(RATES))
    if bad:
        raise ValueError(f"--allow-change accepts {', '.join(RATES)}; got {', '.join(bad)}")
    diff = {k: (v, getattr(cfg, k)) for k, v in dataclasses.asdict(saved).items()
            if getattr(cfg, k) != v}
    changeable = {"meta_iters", "max_minutes", "threads", "data_dir", "batching", "device",
                  *allow}
    if cfg.lr_schedule in ("cosine", "linear"):  # the schedule is laid over meta_iters
        changeable.discard("meta_iters")
    if cfg.lr_schedule.endswith("-time"):  # ... or over max_minutes
        changeable.discard("max_minutes")
    if set(diff) - changeable:
        raise ValueError(f"--resume with a different config: {diff}; only "
                         f"{sorted(changeable)} may change on resume (and, named with "
                         f"--allow-change, {', '.join(RATES)})")


def train(cfg: TrainConfig, out_dir: str, resume: bool = False, progress: bool = True,
          log=print, progress_every_s: float = 60.0, network: Optional[torch.nn.Module] = None,
          samplers=None, allow_change=()) -> Dict[str, Any]:
    """Run (or resume) meta-training; returns a summary (also in out_dir/train_summary.json).

    With ``progress``, a terminal gets a progress bar; output that is not a terminal (a log
    file, a batch job, a torchrun launch) gets a plain line every ``progress_every_s`` seconds.
    ``network`` (default: the config's dataset's Conv-4, built after seeding) and ``samplers``
    (default: the config's meta-train and meta-val splits) let a caller train its own model on
    its own tasks: anything with ``batch(indices) -> TaskBatch``; such a checkpoint is loaded
    back with ``load_state_dict`` into the same network, not with ``MetaModel.load``.
    ``allow_change`` names rates (``RATES``) that a resumed run may change, for a run that
    diverged and continues from its last good checkpoint with a lower rate.
    """
    run = _Run(cfg, out_dir, resume, progress, log, network, samplers, allow_change)
    try:
        return _loop(run, progress_every_s)
    finally:
        run.release()


def _loop(run: "_Run", progress_every_s: float) -> Dict[str, Any]:
    """The iterations of ``train``: step, log, validate, checkpoint, until the last iteration
    or the time budget."""
    from tqdm import tqdm
    cfg = run.cfg
    bar = tqdm(total=cfg.meta_iters, initial=run.start, dynamic_ncols=True,
               desc=f"{cfg.method} {cfg.ways}-way {cfg.shots}-shot",
               disable=None if run.progress else True)
    plain = run.progress and bar.disable  # no terminal: tqdm stays off, plain lines instead
    mark = (time.monotonic(), run.start, run.elapsed)  # when, iteration, seconds of the last line
    it = run.start
    for it in range(run.start + 1, cfg.meta_iters + 1):
        trained = from_rank0(run.elapsed, run.world)  # rank 0's clock decides for every rank
        if cfg.max_minutes is not None and trained >= 60 * cfg.max_minutes:
            it -= 1
            if run.lead:
                bar.write(f"time budget of {cfg.max_minutes} min reached at iteration {it}")
                if it > run.start and it % cfg.val_every:  # the last model is validated too
                    run.validate(it, bar.write)
            break
        g, stats, dt = run.step(it, trained, bar.write)
        if not run.lead:
            continue
        run.metrics.log(iteration=it, split="train", loss=repr(stats["loss"]),
                        accuracy=repr(stats["accuracy"]), grad_norm=repr(float(g.norm())),
                        seconds=f"{dt:.4f}", **{k: cell(stats[k]) for k in SOLVE_STATS})
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{100 * stats['accuracy']:.1f}%",
                        best_val=f"{100 * run.best:.1f}%" if run.best >= 0 else "-")
        if plain and time.monotonic() - mark[0] >= progress_every_s:
            bar.write(_progress_line(cfg, it, (run.elapsed - mark[2]) / (it - mark[1]),
                                     run.elapsed, stats["loss"], stats["accuracy"], run.best,
                                     stats))
            mark = (time.monotonic(), it, run.elapsed)
        if it % cfg.val_every == 0 or it == cfg.meta_iters:
            run.validate(it, bar.write)
        if it % cfg.checkpoint_every == 0:
            run.checkpoint(it, bar.write)
    bar.close()
    barrier(run.world)
    if not run.lead:
        return {"iterations": it, "rank": run.rank}
    return run.finish(it)


def test_best(cfg: TrainConfig, out_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Evaluate ``best.pt`` (chosen on meta-validation) on ``test_tasks`` meta-test tasks."""
    from .checkpoint import MetaModel
    out = Path(out_dir)
    mm = MetaModel.load(out / "best.pt", resolve_device(cfg.device))
    sampler = task_sampler(cfg, "meta_test", cfg.eval_queries, 0, lambda m: None)
    t0 = time.perf_counter()
    res = evaluate(mm.method, mm.model, mm.model.theta(), sampler, cfg.test_tasks, progress=progress)
    final = {"test_accuracy": res.mean, "test_ci95": res.ci95, "test_tasks": res.num_tasks,
             "best_iteration": mm.info["iteration"], "eval_seconds": time.perf_counter() - t0,
             "inner_grad_norm": res.inner_grad_norm, "inner_grew": res.inner_grew,
             "inner_converged": res.inner_converged}
    write_json_atomic(final, out / "final.json")
    return {**final, "result": str(res), "inner_warning": res.inner_warning,
            "inner_summary": res.inner_summary()}
