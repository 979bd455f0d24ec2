"""Names in configs and checkpoints -> methods and networks: the one registry."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .inner import Adam, GradientDescent, Nesterov, NewtonCG
from .meta import FOMAML, IMAML, MAML, Reptile, TruncatedMAML
from .models import miniimagenet_conv4, omniglot_conv4

METHOD_NAMES = ("imaml-gd", "imaml-nesterov", "imaml-hf", "maml", "maml-nesterov", "truncated",
                "fomaml", "reptile")


def build_method(cfg: Dict[str, Any]):
    """A meta-gradient method from a plain dict: ``name`` plus lam (iMAML's λ), inner_lr,
    inner_steps, inner_tol, inner_adaptive (accept/reject step sizing), inner_step_rule ('grow' or
    'bb': how gradient descent sizes adaptive steps), momentum, hf_steps, hf_damping
    (Newton-CG's first Levenberg–Marquardt μ), cg_iters, cg_max_iter, curvature ('hessian' or
    'ggn', iMAML's linear system),
    inner_optimizer ('gd', or 'adam' for FOMAML and Reptile), inner_batch (its mini-batch) and
    inner_carry (carry its moments across meta-iterations),
    linear_solver ('cg' or 'minres'), truncate, prox_lam (the baselines' proximal λ, 0 by
    default). ``adapt`` (which parameters the inner loop adapts) belongs to the model:
    ``adapt_names`` reads it for ``FunctionalModel``. A field the dict lacks (a partial
    dict, or a checkpoint written before the field existed) takes ``TrainConfig``'s default."""
    from .config import TrainConfig  # (which imports this module)
    cfg = {**TrainConfig().method_config(), "name": None, **cfg}  # TrainConfig's defaults
    name, lam, lr, steps, tol = (cfg[k] for k in ("name", "lam", "inner_lr", "inner_steps",
                                                   "inner_tol"))
    adam_inner = cfg["inner_optimizer"] == "adam"
    if adam_inner and name not in ("fomaml", "reptile"):
        raise ValueError(f"inner_optimizer 'adam' is for fomaml and reptile (first-order "
                         f"methods); {name!r} uses its own inner solver")
    gd = GradientDescent(lr=lr, steps=steps, tol=tol, adaptive=cfg["inner_adaptive"],
                         step_rule=cfg["inner_step_rule"])
    nag = Nesterov(lr=lr, steps=steps, tol=tol, momentum=cfg["momentum"],
                   adaptive=cfg["inner_adaptive"])
    system = {k: cfg[k] for k in ("cg_max_iter", "curvature", "linear_solver")}
    if name == "imaml-gd":
        return IMAML(lam=lam, inner=gd, **system)
    if name == "imaml-nesterov":
        return IMAML(lam=lam, inner=nag, **system)
    if name == "imaml-hf":
        hf = NewtonCG(steps=cfg["hf_steps"], cg_iters=cfg["cg_iters"], tol=tol,
                      damping=cfg["hf_damping"])
        return IMAML(lam=lam, inner=hf, **system)
    outer_lam = cfg["prox_lam"]  # baselines: plain inner loop unless asked
    if cfg["inner_carry"] and not adam_inner:
        raise ValueError("inner_carry carries the moments of an Adam inner loop: set "
                         "inner_optimizer 'adam' (fomaml, reptile)")
    if adam_inner:
        adam = Adam(lr=lr, steps=steps, batch_size=cfg["inner_batch"],
                    carry=bool(cfg["inner_carry"]))
        return (FOMAML if name == "fomaml" else Reptile)(inner=adam, lam=outer_lam)
    if name == "maml":
        return MAML(inner=gd, lam=outer_lam)
    if name == "maml-nesterov":
        return MAML(inner=nag, lam=outer_lam)
    if name == "truncated":
        return TruncatedMAML(inner=gd, truncate=cfg["truncate"], lam=outer_lam)
    if name == "fomaml":
        return FOMAML(inner=gd, lam=outer_lam)
    if name == "reptile":
        return Reptile(inner=gd, lam=outer_lam)
    raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}")


def adapt_names(cfg: Dict[str, Any]):
    """The ``adapt`` setting of a method config as a list of names or prefixes (None: all)."""
    value = cfg.get("adapt")
    if value is None:
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not all(names):
        raise ValueError(f"adapt must name parameters or prefixes, comma-separated; got {value!r}")
    return names


def build_network(dataset: str, ways: int) -> torch.nn.Module:
    if dataset == "omniglot":
        return omniglot_conv4(ways)
    if dataset == "miniimagenet":
        return miniimagenet_conv4(ways)
    raise ValueError(f"unknown dataset {dataset!r}; choose 'omniglot' or 'miniimagenet'")
