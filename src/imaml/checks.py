"""Argument checks of the Python API, at the call: each names the argument, what it must be and
what it got (a ``TypeError`` for the wrong kind of value, a ``ValueError`` for a value out of
range), instead of an unrelated failure deep inside torch, or none at all.

At the bottom of the package (no imports from it): the methods, solvers, models and tasks all
use these few functions."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor


def _got(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def whole(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """A whole number (an int, not a bool, a float or a string) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number (int), got {_got(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def number(name: str, value: Any, minimum: Optional[float] = None, positive: bool = False) -> float:
    """A finite real number (not a bool or a string), > 0 with ``positive``, else >=
    ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_got(value)}")
    value = float(value)
    if (not math.isfinite(value) or (positive and not value > 0)
            or (minimum is not None and value < minimum)):
        bound = "> 0 and " if positive else f">= {minimum:g} and " if minimum is not None else ""
        raise ValueError(f"{name} must be {bound}finite, got {value}")
    return value


def tensor(name: str, value: Any, what: str = "a torch.Tensor") -> Tensor:
    """A torch tensor (a list or a NumPy array is named, with the fix)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be {what}, got {_got(value)}"
                        + ("; convert it with torch.as_tensor" if hasattr(value, "__len__")
                           else ""))
    return value


def instance(name: str, value: Any, kinds: tuple, what: str) -> Any:
    """An instance of one of ``kinds`` (a class where an instance is expected is named as such)."""
    if not isinstance(value, kinds):
        hint = " (a class, not an instance: call it)" if isinstance(value, type) else ""
        raise TypeError(f"{name} must be {what}, got {_got(value)}{hint}")
    return value


def function(name: str, value: Any, what: str) -> Any:
    """A callable that is not a class (a class where an instance is expected is named)."""
    if isinstance(value, type) or not callable(value):
        hint = " (a class, not an instance: call it)" if isinstance(value, type) else ""
        raise TypeError(f"{name} must be {what}, got {_got(value)}{hint}")
    return value


# torch's element-wise losses broadcast targets against outputs: [N] against [N, 1] gives an
# [N, N] loss matrix and a wrong mean, with only a warning
_BROADCASTING = (torch.nn.functional.mse_loss, torch.nn.functional.l1_loss,
                 torch.nn.functional.smooth_l1_loss, torch.nn.functional.huber_loss,
                 torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss)


def checked_loss(loss_fn):
    """``loss_fn`` wrapped so that each call checks what it returns: a tensor of one value (a
    float cannot be differentiated; an unreduced loss has no single gradient), and, for
    torch's element-wise losses, targets of the outputs' shape."""
    if getattr(loss_fn, "_imaml_checked", False):
        return loss_fn
    broadcasting = loss_fn in _BROADCASTING or isinstance(loss_fn, _BROADCASTING[4:])

    def loss(outputs, targets):
        if (broadcasting and isinstance(outputs, Tensor) and isinstance(targets, Tensor)
                and outputs.shape != targets.shape):
            raise ValueError(f"loss_fn: targets of shape {tuple(targets.shape)} against outputs "
                             f"of shape {tuple(outputs.shape)} would be broadcast to "
                             f"{tuple(torch.broadcast_shapes(outputs.shape, targets.shape))} "
                             "(every output against every target): give targets the outputs' "
                             "shape (e.g. y.unsqueeze(-1)), or a loss_fn that reshapes")
        value = loss_fn(outputs, targets)
        if not isinstance(value, Tensor):
            raise TypeError(f"loss_fn must return a torch tensor (differentiable), got "
                            f"{_got(value)}")
        if value.dim() != 0:
            raise ValueError(f"loss_fn must return a single value (a mean or a sum), got a "
                             f"tensor of shape {tuple(value.shape)}: reduce it (e.g. "
                             "reduction='mean')")
        return value

    loss._imaml_checked = True
    loss.__wrapped__ = loss_fn
    loss.__name__ = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return loss
