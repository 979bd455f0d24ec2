"""Meta-model checkpoints: the network, the method it was trained with and the task setting.

A checkpoint is a ``torch.save`` dict written atomically (temporary file, then rename), loaded
with ``weights_only=True``:

    {"format": "imaml-checkpoint", "version": 1,
     "dataset": "omniglot" | "miniimagenet", "ways": N, "shots": K, "queries": Q,
     "method": {"name": ..., settings ...}, "state_dict": {...}, ...extra}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .records import torch_save_atomic
from .registry import METHOD_NAMES, adapt_names, build_method, build_network  # noqa: F401

FORMAT, VERSION = "imaml-checkpoint", 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, of another format, or does not fit the model."""


def save_checkpoint(path, module: torch.nn.Module, *, dataset: str, ways: int, shots: int,
                    queries: int, method: Dict[str, Any], **extra) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": VERSION, "dataset": dataset, "ways": ways,
           "shots": shots, "queries": queries, "method": dict(method),
           "state_dict": module.state_dict(), **extra}
    torch_save_atomic(obj, path)


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
        self.model = FunctionalModel(network, adapt=adapt_names(info.get("method", {})))
        self.use_learned_lam()
        self.use_inner_moments()

    def use_learned_lam(self) -> None:
        """Give the method the λ per parameter tensor the run learned (config ``learn_lam``),
        if it learned any."""
        if self.info.get("learned_lam") is not None:
            from .implicit import expand_lam
            p = next(self.network.parameters())
            lam = torch.tensor(self.info["learned_lam"], dtype=p.dtype, device=p.device)
            self.method.lam = expand_lam(self.model, lam)

    def use_inner_moments(self) -> None:
        """Start adaptation from the Adam moments training carried (config ``inner_carry``),
        as Reptile's own code does at test time, if the run carried any."""
        moments = self.info.get("inner_moments")
        if moments is not None:
            p = next(self.network.parameters())
            moments = moments.to(device=p.device, dtype=p.dtype)
            self.method.inner = self.method.inner.with_moments(moments[0], moments[1],
                                                               self.info["inner_t"])

    @classmethod
    def load(cls, path, device="cpu") -> "MetaModel":
        """A checkpoint written on any device, on ``device`` (a name or torch.device)."""
        obj = load_checkpoint(path)
        net, method = model_from_checkpoint(obj)
        return cls(net.to(device), method, {k: v for k, v in obj.items() if k != "state_dict"})

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor) -> torch.Tensor:
        """Task-specific parameters φ (flat) adapted from the meta-parameters θ."""
        x, y = x_support.to(self.device), y_support.to(self.device)
        return self.method.adapt(self.model, self.model.theta(), x, y).phi

    def predict(self, x_support, y_support, x_query) -> torch.Tensor:
        """Labels for ``x_query`` after adapting to the support set."""
        phi = self.adapt(x_support, y_support)
        with torch.no_grad():
            return self.model.forward(phi, x_query.to(self.device)).argmax(-1)
