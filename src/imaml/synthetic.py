"""The paper's synthetic study (Rajeswaran et al. 2019, Section 5.1 / Figure 2).

(a) Accuracy: a linear-regression task family with squared loss, where the proximal inner
    problem has the closed-form solution φ* = (H + λI)⁻¹(b + λθ) with H = XᵀX/n, b = Xᵀy/n,
    and the exact meta-gradient is d L_test(φ*(θ))/dθ = λ (H + λI)⁻¹ ∇L_test(φ*). The study
    measures ‖g − g_exact‖/‖g_exact‖ against the number of inner GD iterations for MAML
    (back-prop through GD on G), iMAML with 1, 2, 5 and 20 CG steps, and first-order MAML.
    With fewer support points than dimensions (the few-shot regime) H has low rank, so CG
    reaches the exact solution in at most rank(H) + 1 steps in exact arithmetic.
(b) Compute and memory: time and peak memory of one task meta-gradient on the Omniglot Conv-4,
    20-way 5-shot, against the number of inner steps, for MAML and iMAML (see ``imaml.bench``).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import torch
from torch import nn

from .bench import machine, sweep
from .functional import FunctionalModel
from .inner import GradientDescent
from .meta import FOMAML, IMAML, MAML
from .records import plt as pyplot, write_json_atomic
from .tasks import Task

INNER_STEPS = [1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200]
CG_STEPS = [1, 2, 5, 20]
MEMORY_STEPS = [5, 10, 25, 50, 100]


def half_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/2n)‖pred − y‖²."""
    return 0.5 * ((pred.squeeze(-1) - y) ** 2).mean()


def regression_task(dim: int = 50, n_support: int = 10, n_query: int = 50, seed: int = 0,
                    scale_spread: float = 0.0, dtype=torch.float64):
    """A task of the family: y = x·w + noise with Gaussian features whose scales run from
    10^spread down to 10^-spread (spread 0: isotropic, κ(G) ≈ 6 at λ = 2 with 10 support
    points in 50 dimensions). Returns (model, θ, task)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(scale_spread, -scale_spread, dim, dtype=dtype)
    w = torch.randn(dim, generator=g, dtype=dtype)
    xs = torch.randn(n_support, dim, generator=g, dtype=dtype) * scales
    xq = torch.randn(n_query, dim, generator=g, dtype=dtype) * scales
    ys = xs @ w + 0.1 * torch.randn(n_support, generator=g, dtype=dtype)
    yq = xq @ w + 0.1 * torch.randn(n_query, generator=g, dtype=dtype)
    model = FunctionalModel(nn.Linear(dim, 1, bias=False).to(dtype), loss_fn=half_mse)
    theta = 0.5 * torch.randn(dim, generator=g, dtype=dtype)
    return model, theta, Task(xs, ys, xq, yq)


def exact_meta_gradient(task: Task, theta: torch.Tensor, lam: float):
    """(g_exact, φ*, H) for the linear model with half-MSE loss, by dense linear algebra."""
    xs, ys, xq, yq = task.x_support, task.y_support, task.x_query, task.y_query
    n, m = xs.shape[0], xq.shape[0]
    H = xs.T @ xs / n
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    phi = torch.linalg.solve(A, xs.T @ ys / n + lam * theta)
    v = xq.T @ (xq @ phi - yq) / m
    return lam * torch.linalg.solve(A, v), phi, H


def _rel(g: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(g - exact) / torch.linalg.vector_norm(exact))


def gradient_error_study(lam: float = 2.0, num_tasks: int = 5, inner_steps=INNER_STEPS,
                         cg_steps=CG_STEPS) -> Dict:
    """Relative meta-gradient error (mean over tasks) of each method against inner iterations."""
    curves: Dict[str, List[float]] = {"maml": [], "fomaml": [],
                                      **{f"imaml_cg{c}": [] for c in cg_steps}}
    conds = []
    per_task = []
    for seed in range(num_tasks):
        model, theta, task = regression_task(seed=seed)
        exact, _, H = exact_meta_gradient(task, theta, lam)
        eig = torch.linalg.eigvalsh(H)
        conds.append(float((eig.max() + lam) / (eig.min().clamp(min=0) + lam)))
        lr = 1.0 / float(eig.max() + lam)  # 1/L for the L-smooth G
        errs = {k: [] for k in curves}
        for k in inner_steps:
            gd = GradientDescent(lr=lr, steps=k)
            errs["maml"].append(_rel(MAML(inner=gd, lam=lam).meta_gradient(model, theta, task).grad, exact))
            errs["fomaml"].append(_rel(FOMAML(inner=gd, lam=lam).meta_gradient(model, theta, task).grad, exact))
            for c in cg_steps:
                r = IMAML(lam=lam, inner=gd, cg_max_iter=c).meta_gradient(model, theta, task)
                errs[f"imaml_cg{c}"].append(_rel(r.grad, exact))
        per_task.append(errs)
    for key in curves:
        curves[key] = [sum(t[key][i] for t in per_task) / num_tasks for i in range(len(inner_steps))]
    return {"lam": lam, "num_tasks": num_tasks, "dim": 50, "n_support": 10, "n_query": 50,
            "dtype": "float64", "inner_lr": "1/(lambda_max(H)+lam) per task",
            "condition_numbers": conds, "inner_steps": list(inner_steps),
            "relative_error": curves, "relative_error_per_task": per_task}


def compute_memory_study(steps=MEMORY_STEPS, reps: int = 3, progress=print) -> Dict:
    rows = sweep(["imaml-gd", "maml"], list(steps), "omniglot-20w5s", "task", reps=reps,
                 progress=progress)
    return {"workload": "Omniglot Conv-4, 20-way 5-shot, 5 queries/class, random images",
            "settings": "inner GD lr 0.1; iMAML lam 2, 5 CG steps; MAML full back-prop",
            "rows": rows}


def plot(results: Dict, out_dir: str) -> List[str]:
    plt = pyplot()

    paths = []
    a = results["gradient_error"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    labels = {"maml": "MAML (back-prop through GD)", "fomaml": "first-order MAML",
              **{f"imaml_cg{c}": f"iMAML, {c} CG steps" for c in CG_STEPS}}
    for key, ys in a["relative_error"].items():
        ax.loglog(a["inner_steps"], [max(y, 1e-17) for y in ys], marker="o", ms=3,
                  label=labels.get(key, key), ls="--" if key == "fomaml" else "-")
    ax.set_xlabel("inner GD iterations")
    ax.set_ylabel("relative error of the meta-gradient")
    ax.set_title(f"Exact meta-gradient study (linear regression, λ={a['lam']}, float64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "gradient_error.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if "compute_memory" in results:
        rows = results["compute_memory"]["rows"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for method, label in (("imaml-gd", "iMAML (GD inner, 5 CG)"), ("maml", "MAML")):
            rs = [r for r in rows if r["method"] == method]
            ks = [r["steps"] for r in rs]
            ax1.plot(ks, [r["seconds"] for r in rs], marker="o", label=label)
            ax2.plot(ks, [r["peak_mib"] for r in rs], marker="o", label=label)
        ax1.set_xlabel("inner steps")
        ax1.set_ylabel("seconds per task meta-gradient")
        ax2.set_xlabel("inner steps")
        ax2.set_ylabel("peak memory above baseline (MiB)")
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle("Omniglot Conv-4, 20-way 5-shot, one task (CPU)")
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "compute_memory.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def run(out_dir: str, skip_compute: bool = False, reps: int = 3, progress=print) -> Dict:
    """Run both parts, write ``out_dir/results.json`` and the PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    progress("(a) meta-gradient accuracy on the linear-regression family ...")
    results = {"gradient_error": gradient_error_study()}
    summary_a = results["gradient_error"]["relative_error"]
    for key, ys in summary_a.items():
        progress(f"  {key:>11}: " + " ".join(f"{y:.1e}" for y in ys))
    path = os.path.join(out_dir, "results.json")

    def write() -> None:  # after each part: an interrupted part (b) keeps part (a)
        results["machine"] = machine()
        results["seconds"] = time.time() - t0
        write_json_atomic(results, path)
        for p in plot(results, out_dir):
            progress(f"wrote {p}")
        progress(f"wrote {path}")

    write()
    if not skip_compute:
        progress("(b) time and peak memory, Omniglot Conv-4 20-way 5-shot ...")
        results["compute_memory"] = compute_memory_study(reps=reps, progress=progress)
        write()
    return results
