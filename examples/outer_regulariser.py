"""An outer loss with an extra term, through the implicit layer.

The outer objective here is the query MSE plus β‖φ*(θ) − θ‖², a penalty on how far adaptation
moves the parameters (a meta-model whose tasks' solutions lie near it). The penalty depends on θ
directly and through φ*(θ); ``imaml.implicit_solution`` returns φ* connected to θ, so autograd
adds both paths and the implicit backward solves (I + H/λ) for the part through φ*. Nothing else
changes: the same sinusoid tasks, model and inner solver as sinusoid.py.

Printed for β = 0 and β = 1 after the same outer steps: the held-out query MSE after adaptation
and the mean squared distance ‖φ* − θ‖² adaptation travelled.

    python examples/outer_regulariser.py
"""
from __future__ import annotations

import torch
from torch import nn

import imaml
from imaml.data import SinusoidTasks
from sinusoid import sinusoid_net


def held_out(model, theta, tasks, inner, lam, num_tasks=100):
    """(mean query MSE after adaptation, mean ‖φ − θ‖²) on held-out tasks."""
    mse = dist = 0.0
    for i in range(num_tasks):
        t = tasks.sample(i)
        phi = imaml.implicit_solution(model, theta, lam, t.x_support, t.y_support, inner).detach()
        mse += float(model.loss(phi, t.x_query, t.y_query)) / num_tasks
        dist += float((phi - theta).square().sum()) / num_tasks
    return mse, dist


def run(beta: float = 1.0, outer_steps: int = 300, meta_batch: int = 10, lam: float = 1.0,
        seed: int = 0, log=print):
    torch.manual_seed(seed)
    model = imaml.FunctionalModel(sinusoid_net(), loss_fn=nn.functional.mse_loss)
    theta = model.theta().requires_grad_(True)
    inner = imaml.GradientDescent(lr=0.1, steps=16, adaptive=True, tol=0.01)
    opt = torch.optim.Adam([theta], lr=1e-3)
    train, test = SinusoidTasks(seed=seed), SinusoidTasks(seed=seed + 1)
    for step in range(outer_steps):
        opt.zero_grad()
        loss = 0.0
        for i in range(step * meta_batch, (step + 1) * meta_batch):
            t = train.sample(i)
            phi = imaml.implicit_solution(model, theta, lam, t.x_support, t.y_support, inner,
                                          linear_solver="minres", max_iter=5)
            extra = beta * (phi - theta).square().sum()
            loss = loss + (model.loss(phi, t.x_query, t.y_query) + extra) / meta_batch
        loss.backward()
        opt.step()
    mse, dist = held_out(model, theta.detach(), test, inner, lam)
    log(f"β = {beta}: after {outer_steps} outer steps, held-out MSE {mse:.3f}, "
        f"mean ‖φ − θ‖² {dist:.3f}")
    return mse, dist


if __name__ == "__main__":
    run(beta=0.0)
    run(beta=1.0)
