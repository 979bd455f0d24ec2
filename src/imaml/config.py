"""The configuration of a meta-training run: every setting with its default, validated where it
enters (a JSON file, ``field=value`` overrides), and the outer learning-rate schedule it
defines."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .inner import GradientDescent, Nesterov, NewtonCG
from .meta import IMAML, MAML, TruncatedMAML
from .registry import METHOD_NAMES, build_method


# the fields of TrainConfig a method is built from (``imaml.registry.build_method``, whose
# defaults for a missing field are TrainConfig's: one home for them)
METHOD_FIELDS = ("lam", "inner_lr", "inner_steps", "inner_tol", "inner_adaptive",
                 "inner_step_rule", "momentum", "hf_steps", "cg_iters", "hf_damping",
                 "cg_max_iter", "curvature", "linear_solver", "truncate", "prox_lam", "adapt",
                 "inner_optimizer", "inner_batch", "inner_carry")


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
    train_shots: Optional[int] = None  # support images per class in meta-training tasks (null: shots; Reptile trains with 10)
    eval_queries: int = 5       # ... and in validation / test tasks
    # method (imaml.registry.build_method); the defaults are the method and solver classes' own
    method: str = "imaml-gd"
    lam: float = IMAML.lam
    inner_lr: float = GradientDescent.lr
    inner_steps: int = GradientDescent.steps
    inner_tol: float = GradientDescent.tol  # δ: stop the inner solve at ‖∇G‖ ≤ lam·inner_tol
    inner_adaptive: bool = GradientDescent.adaptive  # accept/reject step sizing from inner_lr (imaml.inner)
    inner_step_rule: str = GradientDescent.step_rule  # adaptive GD: 'grow' (x1.1 per accepted step) or 'bb' (Barzilai–Borwein)
    # FOMAML and Reptile: 'gd', or 'adam' (β1 0, β2 0.999, fresh per task, as Reptile) on
    # mini-batches of inner_batch support examples (null: all)
    inner_optimizer: str = "gd"
    inner_batch: Optional[int] = None
    # 'adam' only: carry Adam's moments across tasks and meta-iterations (their mean over each
    # meta-batch) and into evaluation, as openai/supervised-reptile's code does; false: fresh
    # moments for every task
    inner_carry: bool = False
    momentum: float = Nesterov.momentum
    hf_steps: int = NewtonCG.steps
    cg_iters: int = NewtonCG.cg_iters
    hf_damping: float = NewtonCG.damping  # iMAML-HF: initial Levenberg–Marquardt μ (0: undamped, Steihaug)
    cg_max_iter: int = IMAML.cg_max_iter
    curvature: str = IMAML.curvature  # iMAML's system: exact Hessian, or 'ggn' (Gauss-Newton)
    linear_solver: str = IMAML.linear_solver  # iMAML's linear solver: 'cg' or 'minres' (indefinite-safe)
    truncate: int = TruncatedMAML.truncate
    prox_lam: float = MAML.lam  # the baselines' proximal λ (0: the plain support loss)
    # the parameters the inner loop adapts: comma-separated names or prefixes ('13.' is the
    # Conv-4 head: ANIL); null adapts all; the others are meta-only (imaml.FunctionalModel)
    adapt: Optional[str] = None
    # iMAML: learn one λ per parameter tensor in the outer loop (λ = exp(s), Adam on s with
    # learning rate lam_lr), starting from lam; the learned λ are used at evaluation too
    learn_lam: bool = False
    lam_lr: float = 0.01
    eval_inner_steps: Optional[int] = None  # inner steps at evaluation (default: inner_steps)
    # outer loop
    outer: str = "adam"
    outer_lr: float = 1e-3
    # 'constant'; 'cosine': outer_lr -> outer_lr_min over meta_iters; 'cosine-time': the same
    # cosine laid over max_minutes of training time, so a time-budgeted run ends its decay;
    # 'linear', 'linear-time': the same, linearly (Reptile's meta step size)
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
    device: str = "auto"     # 'auto' (the GPU when CUDA is available), 'cpu', 'cuda', 'cuda:N'


    def method_config(self, eval: bool = False) -> Dict[str, Any]:
        """The method's settings (``METHOD_FIELDS`` and its ``name``), as ``build_method`` takes
        them and checkpoints keep them; at evaluation ``eval_inner_steps`` where set."""
        cfg = {"name": self.method, **{k: getattr(self, k) for k in METHOD_FIELDS}}
        if eval and self.eval_inner_steps:
            cfg["inner_steps"] = self.eval_inner_steps
        return cfg

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
        if self.learn_lam and not self.method.startswith("imaml"):
            raise ValueError(f"learn_lam learns iMAML's λ; method {self.method!r} has none")
        for name in ("outer_lr", "inner_lr", "lam_lr"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {value}")
        if not 0 <= self.inner_tol < math.inf:  # inf: every solve "converged" at step 0
            raise ValueError(f"inner_tol must be >= 0 and finite, got {self.inner_tol}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise ValueError(f"max_minutes must be > 0 (or null: no budget), got {self.max_minutes}")
        if self.eval_inner_steps is not None and self.eval_inner_steps < 1:
            raise ValueError(f"eval_inner_steps must be at least 1 (or null: inner_steps), "
                             f"got {self.eval_inner_steps}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 (or null: torch's default), "
                             f"got {self.threads}")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:")
                                                           and self.device[5:].isdigit())):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.inner_optimizer not in ("gd", "adam"):
            raise ValueError(f"inner_optimizer must be 'gd' or 'adam', got {self.inner_optimizer!r}")
        if self.linear_solver not in ("cg", "minres"):
            raise ValueError(f"linear_solver must be 'cg' or 'minres', got {self.linear_solver!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule.endswith("-time") and not self.max_minutes:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is laid over max_minutes: set "
                             "max_minutes")
        if self.train_shots is not None and self.train_shots < 1:
            raise ValueError(f"train_shots must be at least 1 (or null: shots), got {self.train_shots}")
        if not 0 <= self.outer_lr_min <= self.outer_lr:
            raise ValueError(f"outer_lr_min must lie in [0, outer_lr], got {self.outer_lr_min}")
        build_method(self.method_config())  # the method's own checks (lam > 0, ...)
        for f in dataclasses.fields(self):  # no NaN or infinity anywhere (config.json is JSON)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")


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
        import difflib
        close = (difflib.get_close_matches(name, types, n=1, cutoff=0.75)
                 or [k for k in types if k.split("_")[0] == name.split("_")[0]])
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


def _no_duplicates(pairs):
    """A JSON object's pairs as a dict, refusing a key given twice (json keeps the last)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} given twice; keep one")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (and not a usable setting); give a finite "
                     "number")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> TrainConfig:
    """A TrainConfig from a JSON file (any subset of fields) and ``key=value`` overrides."""
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"config file {p} is a folder; name the JSON file in it (e.g. "
                             f"{p / 'config.json'})")
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        try:
            raw = json.loads(p.read_text(), object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {p} is not valid JSON: {e}") from None
        except ValueError as e:
            raise ValueError(f"config file {p}: {e}") from None
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


LR_SCHEDULES = ("constant", "cosine", "cosine-time", "linear", "linear-time")


def outer_lr_at(cfg: TrainConfig, iteration: int, elapsed: float = 0.0) -> float:
    """The outer learning rate of iteration ``iteration`` (1-based): constant, or cosine (or
    linear: 'linear', 'linear-time') from ``outer_lr`` at the first iteration to
    ``outer_lr_min`` at ``meta_iters`` ('cosine': a function of the iteration alone, so a
    resumed run follows the same schedule) or at ``max_minutes`` of training time
    ('cosine-time': a function of the ``elapsed`` training seconds before the iteration, which
    the checkpoint keeps; timings differ from run to run, so such a run is not
    bit-reproducible)."""
    if cfg.lr_schedule == "constant" or (not cfg.lr_schedule.endswith("-time")
                                         and cfg.meta_iters == 1):
        return cfg.outer_lr
    if cfg.lr_schedule.endswith("-time"):
        frac = min(1.0, elapsed / (60 * cfg.max_minutes))
    else:
        frac = (iteration - 1) / (cfg.meta_iters - 1)
    if cfg.lr_schedule.startswith("linear"):  # Reptile's meta step size (Nichol et al. 2018)
        return cfg.outer_lr + (cfg.outer_lr_min - cfg.outer_lr) * frac
    return cfg.outer_lr_min + 0.5 * (cfg.outer_lr - cfg.outer_lr_min) * (1 + math.cos(math.pi * frac))
