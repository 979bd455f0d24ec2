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
    ``adapt_names`` reads it for ``FunctionalModel``."""
    name = cfg.get("name")
    adam_inner = cfg.get("inner_optimizer", "gd") == "adam"
    if adam_inner and name not in ("fomaml", "reptile"):
        raise ValueError(f"inner_optimizer 'adam' is for fomaml and reptile (first-order "
                         f"methods); {name!r} uses its own inner solver")
    lam, lr, steps = cfg.get("lam", 2.0), cfg.get("inner_lr", 0.1), cfg.get("inner_steps", 16)
    tol, cg = cfg.get("inner_tol", 0.0), cfg.get("cg_max_iter", 5)
    adaptive = cfg.get("inner_adaptive", False)
    gd = GradientDescent(lr=lr, steps=steps, tol=tol, adaptive=adaptive,
                         step_rule=cfg.get("inner_step_rule", "grow"))
    nag = Nesterov(lr=lr, steps=steps, tol=tol, momentum=cfg.get("momentum", 0.9),
                   adaptive=adaptive)
    system = dict(cg_max_iter=cg, curvature=cfg.get("curvature", "hessian"),
                  linear_solver=cfg.get("linear_solver", "cg"))
    if name == "imaml-gd":
        return IMAML(lam=lam, inner=gd, **system)
    if name == "imaml-nesterov":
        return IMAML(lam=lam, inner=nag, **system)
    if name == "imaml-hf":
        hf = NewtonCG(steps=cfg.get("hf_steps", 5), cg_iters=cfg.get("cg_iters", 5), tol=tol,
                      damping=cfg.get("hf_damping", 0.0))
        return IMAML(lam=lam, inner=hf, **system)
    outer_lam = cfg.get("prox_lam", 0.0)  # baselines: plain inner loop unless asked
    if cfg.get("inner_carry") and not adam_inner:
        raise ValueError("inner_carry carries the moments of an Adam inner loop: set "
                         "inner_optimizer 'adam' (fomaml, reptile)")
    if adam_inner:
        adam = Adam(lr=lr, steps=steps, batch_size=cfg.get("inner_batch"),
                    carry=bool(cfg.get("inner_carry", False)))
        return (FOMAML if name == "fomaml" else Reptile)(inner=adam, lam=outer_lam)
    if name == "maml":
        return MAML(inner=gd, lam=outer_lam)
    if name == "maml-nesterov":
        return MAML(inner=nag, lam=outer_lam)
    if name == "truncated":
        return TruncatedMAML(inner=gd, truncate=cfg.get("truncate", 5), lam=outer_lam)
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
