"""How accurate is the meta-gradient's linear solve (I + H/λ) g = ∇L_test(φ) on real tasks?

``imaml solver-accuracy --checkpoint NAME=PATH ... --out DIR`` takes meta-trained checkpoints
(for example an early, a middle and a final one of a run), draws meta-validation tasks of their
setting, and for each task, in float64:

1. a reference: the inner problem solved to ‖∇G‖ ≤ ``ref_tol`` (adaptive Nesterov, then
   Newton-CG with long CG runs where needed; the norm reached is recorded), and
   g* = 200 MINRES iterations on the exact system at that φ;
2. each linear solver at 5 and 20 iterations, at the reference φ (the linear solve's own error)
   and at the φ of the checkpoint's own inner solver (what training actually computes):
   CG and MINRES on the exact system; CG on the Gauss-Newton system I + G/λ; CG on the normal
   equations AᵀA g = Aᵀv (the default of torchopt and jaxopt; two products per iteration);
   and CG on the official code's operator 2I + H/(λ + 10).

It reports the relative error ‖g − g*‖ / ‖g*‖ per task, a table of medians (and 90th
percentiles) and a plot.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Sequence

import torch
from torch.func import grad

from .functional import FunctionalModel, ProximalProblem, make_ggn, make_hvp, task_loss
from .inner import Nesterov, NewtonCG
from .linear import conjugate_gradient, minres
from .records import plt, write_json_atomic, write_text_atomic

ITERS = (5, 20)


def _solvers(lam: float) -> Dict[str, Callable]:
    """name -> solve(H, G, v, iterations) -> g, with H and G the Hessian and Gauss-Newton
    products of the support loss at φ."""
    def exact(H):
        return lambda u: u + H(u) / lam

    def normal(H, G, v, k):
        A = exact(H)
        return conjugate_gradient(lambda u: A(A(u)), A(v), max_iter=k).x

    return {
        "CG": lambda H, G, v, k: conjugate_gradient(exact(H), v, max_iter=k).x,
        "MINRES": lambda H, G, v, k: minres(exact(H), v, max_iter=k).x,
        "Gauss-Newton CG": lambda H, G, v, k: conjugate_gradient(exact(G), v, max_iter=k).x,
        "normal-equations CG": normal,
        "official 2I + H/(λ+10)": lambda H, G, v, k: conjugate_gradient(
            lambda u: 2 * u + H(u) / (lam + 10), v, max_iter=k).x,
    }


def reference_inner(problem: ProximalProblem, theta: torch.Tensor, tol: float):
    """φ with ‖∇G(φ)‖ ≤ tol where the solvers can reach it: 1000 steps of adaptive Nesterov,
    then 20 Newton-CG steps of up to 50 CG iterations each. Returns (φ, ‖∇G(φ)‖): on the
    ReLU + batch-norm networks the norm often stalls well above 1e-6 (the table says where)."""
    lam = problem.lam_min
    with torch.no_grad():
        r = Nesterov(lr=0.1, momentum=0.9, steps=1000, tol=tol / lam, adaptive=True,
                     report=True).solve(problem, theta)
        phi, norm = r.phi, r.grad_norm
        if norm > tol:
            r = NewtonCG(steps=20, cg_iters=50, tol=tol / lam, report=True).solve(problem, phi)
            if r.grad_norm < norm:
                phi, norm = r.phi, r.grad_norm
    return phi.detach(), norm


def _task_rows(fm: FunctionalModel, method, theta, task, lam: float, iters: Sequence[int],
               ref_tol: float) -> List[Dict]:
    xs, ys, xq, yq = task.x_support, task.y_support, task.x_query, task.y_query
    support = task_loss(fm, xs, ys)
    problem = ProximalProblem(support, theta, lam)
    phi_ref, ref_norm = reference_inner(problem, theta, ref_tol)
    with torch.no_grad():
        practical = method.inner.solve(problem, theta)
    query = task_loss(fm, xq, yq)
    solvers = _solvers(lam)
    rows = []
    for where, phi in (("reference", phi_ref), ("inner solver", practical.phi.detach())):
        v = grad(query)(phi)
        H = make_hvp(support, phi, "rev-rev")
        G = make_ggn(fm, xs, ys, phi)
        if where == "reference":  # g*: the exact system at the reference φ, long MINRES
            ref = minres(lambda u: u + H(u) / lam, v, max_iter=200)
            g_ref = ref.x
            ref_res = ref.residual / max(ref.residual_norms[0], 1e-300)
        for name, solve in solvers.items():
            for k in iters:
                g = solve(H, G, v, k)
                err = float(torch.linalg.vector_norm(g - g_ref) / torch.linalg.vector_norm(g_ref))
                rows.append({"phi": where, "solver": name, "iterations": k, "rel_error": err})
    for r in rows:
        r.update(ref_inner_grad_norm=ref_norm, ref_minres_residual=ref_res,
                 inner_grad_norm=practical.grad_norm, inner_converged=practical.converged)
    return rows


def study(checkpoints: Dict[str, str], data_dir=None, tasks: int = 10, seed: int = 1,
          iters: Sequence[int] = ITERS, ref_tol: float = 1e-6, progress=print) -> List[Dict]:
    """The rows of the study (one per checkpoint, task, φ, solver and iteration count)."""
    from .checkpoint import MetaModel
    from .data import TaskSampler, load_split
    rows: List[Dict] = []
    for label, path in checkpoints.items():
        mm = MetaModel.load(path)
        info = mm.info
        lam = float(info["method"].get("lam", 2.0))
        fm = FunctionalModel(mm.network.double())
        theta = fm.theta()
        kw = {"kind": "random"} if info["dataset"] == "omniglot" else {}
        classes = load_split(info["dataset"], "meta_val", data_dir, **kw)
        sampler = TaskSampler(classes, info["ways"], info["shots"], info["queries"], seed=seed)
        t0 = time.perf_counter()
        for i in range(tasks):
            t = sampler.sample(i)
            t.x_support, t.x_query = t.x_support.double(), t.x_query.double()
            for r in _task_rows(fm, mm.method, theta, t, lam, iters, ref_tol):
                rows.append({"checkpoint": label, "iteration": info.get("iteration"), "task": i, **r})
            progress(f"{label}: task {i + 1}/{tasks} ({time.perf_counter() - t0:.0f} s)")
    return rows


def _quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(q * len(xs))) - 1)]


def table(rows: List[Dict]) -> str:
    """Markdown: median (90th percentile) relative error per checkpoint, φ, solver, iterations."""
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    iters = sorted({r["iterations"] for r in rows})
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    lines = []
    origin = {"reference": "the reference inner solve",
              "inner solver": "the checkpoint's own inner solver"}
    for where in ("reference", "inner solver"):
        head = "| solver | " + " | ".join(f"{c}, {k} it." for c in labels for k in iters) + " |"
        lines += [f"At φ from {origin[where]} (median relative error, 90th percentile in "
                  "brackets):", "", head, "|---" * (1 + len(labels) * len(iters)) + "|"]
        for s in solvers:
            cells = []
            for c in labels:
                for k in iters:
                    e = [r["rel_error"] for r in rows if (r["checkpoint"], r["phi"], r["solver"],
                                                          r["iterations"]) == (c, where, s, k)]
                    cells.append(f"{_quantile(e, 0.5):.2g} ({_quantile(e, 0.9):.2g})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    for c in labels:
        rs = [r for r in rows if r["checkpoint"] == c and r["phi"] == "reference"]
        per_task = {r["task"]: r for r in rs}.values()
        ref = [r["ref_inner_grad_norm"] for r in per_task]
        inner = [r["inner_grad_norm"] for r in per_task if r["inner_grad_norm"] is not None]
        lines.append(f"- {c} (iteration {rs[0]['iteration']}): reference ‖∇G‖ median "
                     f"{_quantile(ref, 0.5):.1e}, max {max(ref):.1e} over {len(ref)} tasks; "
                     f"reference MINRES relative residual max "
                     f"{max(r['ref_minres_residual'] for r in per_task):.1e}"
                     + (f"; the checkpoint's inner solver: median ‖∇G‖ {_quantile(inner, 0.5):.2g}"
                        if inner else ""))
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path) -> None:
    pyplot = plt()
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    iters = sorted({r["iterations"] for r in rows})
    fig, axes = pyplot.subplots(2, len(labels), figsize=(4.2 * len(labels), 7), squeeze=False,
                                sharey=True)
    width = 0.8 / len(iters)
    for col, c in enumerate(labels):
        for row, where in enumerate(("reference", "inner solver")):
            ax = axes[row][col]
            for j, k in enumerate(iters):
                med = [_quantile([r["rel_error"] for r in rows if (r["checkpoint"], r["phi"],
                                  r["solver"], r["iterations"]) == (c, where, s, k)], 0.5)
                       for s in solvers]
                ax.bar([i + j * width for i in range(len(solvers))], med, width, label=f"{k} it.")
            ax.set_yscale("log")
            ax.set_xticks([i + width * (len(iters) - 1) / 2 for i in range(len(solvers))])
            ax.set_xticklabels(solvers, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{c}, φ: {where}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            if col == 0:
                ax.set_ylabel("median ‖g − g*‖ / ‖g*‖")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def run(out_dir: str, checkpoints: Dict[str, str], data_dir=None, tasks: int = 10,
        progress=print) -> str:
    """The study, written to out_dir (solver_accuracy.json/.md/.png); returns the table."""
    rows = study(checkpoints, data_dir, tasks, progress=progress)
    text = table(rows)
    write_json_atomic({"rows": rows, "tasks": tasks, "iterations": list(ITERS)},
                      f"{out_dir}/solver_accuracy.json")
    write_text_atomic(text, f"{out_dir}/solver_accuracy.md")
    plot(rows, f"{out_dir}/solver_accuracy.png")
    return text
