"""Meta-model checkpoints: the network, the method it was trained with and the task setting.

A checkpoint is a ``torch.save`` dict written atomically (temporary file, then rename), loaded
with ``weights_only=True``:

    {"format": "imaml-checkpoint", "version": 1,
     "dataset": "omniglot" | "miniimagenet", "ways": N, "shots": K, "queries": Q,
     "method": {"name": ..., settings ...}, "state_dict": {...}, ...extra}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from .inner import GradientDescent, Nesterov, NewtonCG
from .meta import FOMAML, IMAML, MAML, Reptile, TruncatedMAML
from .models import miniimagenet_conv4, omniglot_conv4

FORMAT, VERSION = "imaml-checkpoint", 1
METHOD_NAMES = ("imaml-gd", "imaml-nesterov", "imaml-hf", "maml", "maml-nesterov", "truncated",
                "fomaml", "reptile")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, of another format, or does not fit the model."""


def build_method(cfg: Dict[str, Any]):
    """A meta-gradient method from a plain dict: ``name`` plus lam (iMAML's λ), inner_lr,
    inner_steps, inner_tol, momentum, hf_steps, cg_iters, cg_max_iter, curvature ('hessian' or
    'ggn', iMAML's linear system), truncate, prox_lam (the baselines' proximal λ, 0 by default)."""
    name = cfg.get("name")
    lam, lr, steps = cfg.get("lam", 2.0), cfg.get("inner_lr", 0.1), cfg.get("inner_steps", 16)
    tol, cg = cfg.get("inner_tol", 0.0), cfg.get("cg_max_iter", 5)
    adaptive = cfg.get("inner_adaptive", False)
    gd = GradientDescent(lr=lr, steps=steps, tol=tol, adaptive=adaptive)
    nag = Nesterov(lr=lr, steps=steps, tol=tol, momentum=cfg.get("momentum", 0.9),
                   adaptive=adaptive)
    system = dict(cg_max_iter=cg, curvature=cfg.get("curvature", "hessian"),
                  linear_solver=cfg.get("linear_solver", "cg"))
    if name == "imaml-gd":
        return IMAML(lam=lam, inner=gd, **system)
    if name == "imaml-nesterov":
        return IMAML(lam=lam, inner=nag, **system)
    if name == "imaml-hf":
        hf = NewtonCG(steps=cfg.get("hf_steps", 5), cg_iters=cfg.get("cg_iters", 5), tol=tol)
        return IMAML(lam=lam, inner=hf, **system)
    outer_lam = cfg.get("prox_lam", 0.0)  # baselines: plain inner loop unless asked
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


def build_network(dataset: str, ways: int) -> torch.nn.Module:
    if dataset == "omniglot":
        return omniglot_conv4(ways)
    if dataset == "miniimagenet":
        return miniimagenet_conv4(ways)
    raise ValueError(f"unknown dataset {dataset!r}; choose 'omniglot' or 'miniimagenet'")


def save_checkpoint(path, module: torch.nn.Module, *, dataset: str, ways: int, shots: int,
                    queries: int, method: Dict[str, Any], **extra) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": VERSION, "dataset": dataset, "ways": ways,
           "shots": shots, "queries": queries, "method": dict(method),
           "state_dict": module.state_dict(), **extra}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> Dict[str, Any]:
    """Read and validate a checkpoint dict; CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); it is truncated or not a checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imaml checkpoint")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')}; "
                              f"this imaml reads version {VERSION}")
    return obj


def model_from_checkpoint(obj: Dict[str, Any]):
    """(network with the checkpoint's weights, method) from a loaded checkpoint."""
    net = build_network(obj["dataset"], obj["ways"])
    try:
        net.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit the {obj['dataset']} "
                              f"{obj['ways']}-way network: {str(e)[:300]}") from None
    return net, build_method(obj["method"])


class MetaModel:
    """A meta-trained network with the method it was trained with, ready for new tasks.

    >>> mm = MetaModel.load("runs/omniglot/best.pt")
    >>> labels = mm.predict(x_support, y_support, x_query)
    """

    def __init__(self, network: torch.nn.Module, method, info: Dict[str, Any]):
        from .functional import FunctionalModel
        self.network, self.method, self.info = network, method, info
        self.model = FunctionalModel(network)

    @classmethod
    def load(cls, path) -> "MetaModel":
        obj = load_checkpoint(path)
        net, method = model_from_checkpoint(obj)
        return cls(net, method, {k: v for k, v in obj.items() if k != "state_dict"})

    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor) -> torch.Tensor:
        """Task-specific parameters φ (flat) adapted from the meta-parameters θ."""
        return self.method.adapt(self.model, self.model.theta(), x_support, y_support).phi

    def predict(self, x_support, y_support, x_query) -> torch.Tensor:
        """Labels for ``x_query`` after adapting to the support set."""
        phi = self.adapt(x_support, y_support)
        with torch.no_grad():
            return self.model.forward(phi, x_query).argmax(-1)
