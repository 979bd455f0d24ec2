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

from . import checks
from .records import torch_save_atomic
from .registry import METHOD_NAMES, adapt_names, build_method, build_network  # noqa: F401

FORMAT, VERSION = "imaml-checkpoint", 1
IMAGE_SHAPES = {"omniglot": (1, 28, 28), "miniimagenet": (3, 84, 84)}


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
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; name the checkpoint file in it "
                              f"(e.g. {path / 'best.pt'})")
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
    kinds = {"dataset": str, "ways": int, "shots": int, "queries": int, "method": dict,
             "state_dict": dict}
    bad = [k for k, kind in kinds.items() if not isinstance(obj.get(k), kind)]
    if bad or not isinstance(obj["method"].get("name"), str):
        raise CheckpointError(f"{path} lacks {', '.join(bad) or 'the method name'} (or holds "
                              "the wrong kind of value there): it was not written whole by "
                              "imaml train, or was edited; use a checkpoint imaml wrote")
    broken = [k for k, t in obj["state_dict"].items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()
              and not bool(torch.isfinite(t).all())]
    if broken:
        raise CheckpointError(f"{path} holds non-finite weights (NaN or infinity in "
                              f"{', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): "
                              "the run that wrote it had diverged, or the file was damaged; "
                              "use an earlier checkpoint of the run")
    return obj


def model_from_checkpoint(obj: Dict[str, Any]):
    """(network with the checkpoint's weights, method) from a loaded checkpoint."""
    try:
        net = build_network(obj["dataset"], obj["ways"])
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's network cannot be built: {e}") from None
    try:
        net.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit the {obj['dataset']} "
                              f"{obj['ways']}-way network: {str(e)[:300]}") from None
    try:
        return net, build_method(obj["method"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's method {obj['method'].get('name')!r} cannot "
                              f"be built from its settings: {e}") from None


class MetaModel:
    """A meta-trained network with the method it was trained with, ready for new tasks.

    >>> mm = MetaModel.load("runs/omniglot/best.pt")
    >>> labels = mm.predict(x_support, y_support, x_query)
    """

    def __init__(self, network: torch.nn.Module, method, info: Dict[str, Any]):
        from .functional import FunctionalModel
        self.network, self.method, self.info = network, method, info
        self.image_shape = None  # [C, H, W] the network takes, where known (``load``)
        self.model = FunctionalModel(network, adapt=adapt_names(info.get("method", {})))
        self.method = self.trained_state().apply(method)

    def trained_state(self):
        """What training carried into adaptation (an ``imaml.outer.OuterState``): the λ per
        parameter tensor the run learned (config ``learn_lam``) and the Adam moments it carried
        (config ``inner_carry``; adaptation starts from them, as in Reptile's own code), where
        the run had them."""
        from .implicit import expand_lam
        from .outer import OuterState
        p = next(self.network.parameters())
        lam, moments = self.info.get("learned_lam"), self.info.get("inner_moments")
        return OuterState(
            None if lam is None else expand_lam(self.model, torch.tensor(lam, dtype=p.dtype,
                                                                         device=p.device)),
            None if moments is None else moments.to(device=p.device, dtype=p.dtype),
            self.info.get("inner_t", 0))

    @classmethod
    def load(cls, path, device="cpu") -> "MetaModel":
        """A checkpoint written on any device, on ``device`` (a name or torch.device)."""
        obj = load_checkpoint(path)
        net, method = model_from_checkpoint(obj)
        mm = cls(net.to(device), method, {k: v for k, v in obj.items() if k != "state_dict"})
        mm.image_shape = IMAGE_SHAPES.get(obj["dataset"])  # the paper's networks' inputs
        return mm

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _check_images(self, name: str, x) -> None:
        checks.tensor(name, x)
        if self.image_shape and (x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; this {self.info['dataset']} "
                             f"network takes images [N, {', '.join(map(str, self.image_shape))}]")

    def adapt(self, x_support: torch.Tensor, y_support: torch.Tensor) -> torch.Tensor:
        """Task-specific parameters φ (flat) adapted from the meta-parameters θ."""
        self._check_images("x_support", x_support)
        checks.tensor("y_support", y_support)
        ways = self.info.get("ways")
        if ways and (y_support.dtype not in (torch.int64, torch.int32) or y_support.dim() != 1
                     or sorted(y_support.unique().tolist()) != list(range(ways))):
            raise ValueError(f"y_support must hold the labels 0..{ways - 1} of this {ways}-way "
                             f"model, each at least once (integer, 1-D); got "
                             f"{y_support.dtype} labels {sorted(y_support.unique().tolist())[:8]}")
        x, y = x_support.to(self.device), y_support.to(self.device)
        return self.method.adapt(self.model, self.model.theta(), x, y).phi

    def predict(self, x_support, y_support, x_query) -> torch.Tensor:
        """Labels for ``x_query`` after adapting to the support set."""
        self._check_images("x_query", x_query)
        phi = self.adapt(x_support, y_support)
        with torch.no_grad():
            return self.model.forward(phi, x_query.to(self.device)).argmax(-1)
