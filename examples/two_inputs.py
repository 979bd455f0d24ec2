"""A model with two inputs, passed by keyword: iMAML on sinusoids with side information.

Each task is a sinusoid y = A sin(x − b); besides x, the model receives a second input, a noisy
hint of the task's amplitude (A plus Gaussian noise of 0.5, the same for every point of a task).
Inputs go to the model as a dict, ``model(x=..., hint=...)``: a ``Task``'s inputs may be a
tensor, a tuple (positional arguments) or a dict (keyword arguments), and the per-task loop, the
vmapped meta-batch and ``evaluate`` all take them. Printed: the held-out query MSE after
adaptation, before and after meta-training.

    python examples/two_inputs.py
"""
from __future__ import annotations

import torch
from torch import nn

import imaml
from imaml.batched import batch_meta_gradient
from imaml.data import SinusoidTasks
from imaml.evaluate import evaluate
from imaml.outer import apply_meta_gradient


class HintedNet(nn.Module):
    """An MLP on (x, hint): two inputs, one network."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                                 nn.Linear(40, 1))

    def forward(self, x, hint):
        return self.net(torch.cat([x, hint], -1))


class HintedTasks:
    """Sinusoid tasks whose inputs are {"x": x, "hint": noisy amplitude} (a task sampler:
    ``batch(indices) -> TaskBatch``)."""

    def __init__(self, seed: int, noise: float = 0.5):
        self.tasks, self.noise, self.seed = SinusoidTasks(seed=seed), noise, seed

    def _inputs(self, x, amplitude, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        hint = amplitude + self.noise * torch.randn((), generator=g)
        return {"x": x, "hint": hint.expand_as(x).clone()}

    def batch(self, indices) -> imaml.TaskBatch:
        indices = list(indices)
        b = self.tasks.batch(indices)
        amps = torch.tensor([self.tasks.parameters(i)[0] for i in indices]).reshape(-1, 1, 1)
        hints = [self._inputs(b.x_support[k], amps[k], i) for k, i in enumerate(indices)]
        queries = [self._inputs(b.x_query[k], amps[k], i) for k, i in enumerate(indices)]
        stack = lambda ds: {k: torch.stack([d[k] for d in ds]) for k in ds[0]}  # noqa: E731
        return imaml.TaskBatch(stack(hints), b.y_support, stack(queries), b.y_query)


def run(outer_steps: int = 600, meta_batch: int = 10, eval_tasks: int = 100, seed: int = 0,
        log=print):
    torch.manual_seed(seed)
    net = HintedNet()
    model = imaml.FunctionalModel(net, loss_fn=nn.functional.mse_loss)
    method = imaml.IMAML(lam=1.0, inner=imaml.GradientDescent(lr=0.1, steps=16, adaptive=True,
                                                              tol=0.01),
                         cg_max_iter=5, linear_solver="minres")
    train, test = HintedTasks(seed), HintedTasks(seed + 1)
    before = evaluate(method, model, model.theta(), test, eval_tasks, progress=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(outer_steps):
        batch = train.batch(range(step * meta_batch, (step + 1) * meta_batch))
        apply_meta_gradient(model, opt, batch_meta_gradient(method, model, model.theta(), batch).grad)
    after = evaluate(method, model, model.theta(), test, eval_tasks, progress=False)
    log(f"two inputs (x, hint): held-out query MSE {before.mean:.3f} before, {after.mean:.3f} "
        f"after {outer_steps} outer steps")
    return before, after


if __name__ == "__main__":
    run()
