"""Meta-learning λ itself: one proximal strength per parameter tensor, learned in the outer loop
by the implicit gradient ∂L_test/∂λ, beside θ (MAML's sinusoid regression, as in sinusoid.py).

The implicit layer (``imaml.implicit_solution``) returns the adapted φ*(θ, λ) connected to θ and
to λ; λ = exp(log λ) keeps it positive, and Adam updates θ and log λ together. Printed: the
held-out query MSE after adaptation and the λ of each parameter tensor, for λ fixed at 1 and for
λ learned from 1, after the same number of outer steps.

    python examples/learned_lambda.py
"""
from __future__ import annotations

import torch
from torch import nn

import imaml
from imaml.data import SinusoidTasks
from sinusoid import sinusoid_net


def held_out_mse(model, theta, lam, tasks, inner, num_tasks=100):
    """Mean query MSE after adaptation with per-parameter λ (``lam`` expanded)."""
    total = 0.0
    for i in range(num_tasks):
        t = tasks.sample(i)
        phi = imaml.implicit_solution(model, theta, lam, t.x_support, t.y_support, inner).detach()
        total += float(model.loss(phi, t.x_query, t.y_query))
    return total / num_tasks


def run(outer_steps: int = 300, meta_batch: int = 10, learn: bool = True, seed: int = 0,
        log=print):
    """Meta-train θ (and log λ when ``learn``); returns (held-out MSE, λ per parameter tensor)."""
    torch.manual_seed(seed)
    model = imaml.FunctionalModel(sinusoid_net(), loss_fn=nn.functional.mse_loss)
    theta = model.theta().requires_grad_(True)
    log_lam = torch.zeros(len(model.names), requires_grad=learn)  # λ = 1 for every tensor
    inner = imaml.GradientDescent(lr=0.1, steps=16, adaptive=True, tol=0.01)
    opt = torch.optim.Adam([theta, log_lam] if learn else [theta], lr=1e-3)
    train, test = SinusoidTasks(seed=seed), SinusoidTasks(seed=seed + 1)
    for step in range(outer_steps):
        opt.zero_grad()
        loss = 0.0
        for i in range(step * meta_batch, (step + 1) * meta_batch):
            t = train.sample(i)
            phi = imaml.implicit_solution(model, theta, log_lam.exp(), t.x_support, t.y_support,
                                          inner, linear_solver="minres", max_iter=5)
            loss = loss + model.loss(phi, t.x_query, t.y_query) / meta_batch
        loss.backward()
        opt.step()
    mse = held_out_mse(model, theta.detach(), log_lam.detach().exp(), test, inner)
    lams = dict(zip(model.names, log_lam.detach().exp().tolist()))
    log(f"{'learned' if learn else 'fixed'} λ after {outer_steps} outer steps: held-out MSE "
        f"{mse:.3f}; λ " + ", ".join(f"{k} {v:.2f}" for k, v in lams.items()))
    return mse, lams


if __name__ == "__main__":
    run(learn=False)
    run(learn=True)
