"""Which inner solver and λ solve iMAML's proximal problem on Mini-ImageNet 5-way 1-shot to
‖∇G‖ ≤ λδ, and how well does 5 or 10 MINRES iterations solve (I + H/λ) g = ∇L_test after it?
On 16 fixed meta-val tasks (15 queries per class) of a fresh Conv-4 (32 filters, the seed of the
runs), one thread: per candidate, the fraction of solves within λδ and 2λδ (δ 0.05; 0.1 with --hf), mean
‖∇G‖ at θ and at the end, steps, negative-curvature systems, query accuracy after the solve and
milliseconds per task; then, for the solver with the most solves within λδ (ties: within 2λδ, then the
smallest mean ‖∇G‖), the meta-gradient of the 16 tasks with
MINRES on the exact Hessian: the final/first residual ratio and seconds per task.
Run from the repository root with IMAML_DATA set (one process per λ, one per core):
    python scripts/probe_mini.py LAMBDA [--no-fresh] [--hf] [LABEL=CHECKPOINT ...]
(--hf: the Hessian-free candidates, plain and damped Newton-CG, with δ 0.1 instead of 0.05.)
Output kept in docs/benchmarks/probe_mini_lam<LAMBDA>.txt (fresh network),
probe_mini_trained_lam<LAMBDA>.txt (the trial model) and probe_mini_hf_lam<LAMBDA>.txt (--hf)."""
import sys
import time

import torch

from imaml import IMAML, FunctionalModel, GradientDescent, Nesterov, NewtonCG
from imaml.checkpoint import MetaModel, build_network
from imaml.train import load_config, task_sampler
from probe_common import solve_tasks, solver_row

torch.set_num_threads(1)
LAM = float(sys.argv[1])
TOL = 0.05
SOLVERS = {
    "GD BB 10 from .01": GradientDescent(lr=0.01, steps=10, adaptive=True, step_rule="bb",
                                         tol=TOL),
    "GD BB 25 from .01": GradientDescent(lr=0.01, steps=25, adaptive=True, step_rule="bb",
                                         tol=TOL),
    "GD BB 50 from .01": GradientDescent(lr=0.01, steps=50, adaptive=True, step_rule="bb",
                                         tol=TOL),
    "GD BB 100 from .01": GradientDescent(lr=0.01, steps=100, adaptive=True, step_rule="bb",
                                          tol=TOL),
    "GD grow 25 from .01": GradientDescent(lr=0.01, steps=25, adaptive=True, tol=TOL),
    "Nesterov 25 from .01": Nesterov(lr=0.01, momentum=0.9, steps=25, adaptive=True, tol=TOL,
                                     report=True),
    "Nesterov 50 from .01": Nesterov(lr=0.01, momentum=0.9, steps=50, adaptive=True, tol=TOL,
                                     report=True),
    "Newton 10x5 damped 1": NewtonCG(steps=10, cg_iters=5, tol=TOL, damping=1.0),
}

if "--hf" in sys.argv:  # Hessian-free candidates only, at the tolerance δ 0.1
    TOL = 0.1
    SOLVERS = {
        "GD BB 25 from .01": GradientDescent(lr=0.01, steps=25, adaptive=True, step_rule="bb",
                                             tol=TOL),
        "Newton 10x5 plain": NewtonCG(steps=10, cg_iters=5, tol=TOL),
        "Newton 10x5 damped 1": NewtonCG(steps=10, cg_iters=5, tol=TOL, damping=1.0),
        "Newton 10x5 damped 10": NewtonCG(steps=10, cg_iters=5, tol=TOL, damping=10.0),
        "Newton 10x5 damped 50": NewtonCG(steps=10, cg_iters=5, tol=TOL, damping=50.0),
        "Newton 20x3 damped 10": NewtonCG(steps=20, cg_iters=3, tol=TOL, damping=10.0),
    }

cfg = load_config("configs/miniimagenet_5w1s_maml_cpu2h.json", [])
sampler = task_sampler(cfg, "meta_val", 15, cfg.seed + 1, lambda m: None)
tasks = [sampler.sample(i) for i in range(16)]
method = IMAML(lam=LAM, curvature="hessian")


def models():
    torch.manual_seed(cfg.seed)
    if "--no-fresh" not in sys.argv:
        yield "fresh network (seed of the runs)", FunctionalModel(build_network("miniimagenet", 5))
    for arg in (a for a in sys.argv[2:] if not a.startswith("--")):
        label, _, path = arg.rpartition("=")
        mm = MetaModel.load(path)
        yield f"{label or path} ({path}, iteration {mm.info.get('iteration')})", mm.model


lo, hi = LAM * TOL, LAM * 2 * TOL
print(f"Mini-ImageNet 5-way 1-shot, {len(tasks)} meta-val tasks (15 queries per class), λ {LAM}, "
      f"tolerance ‖∇G‖ ≤ λδ with δ {TOL:g} ({lo:g}) and δ {2 * TOL:g} ({hi:g}); torch {torch.__version__}, "
      f"1 thread")
for label, model in models():
    theta = model.theta().detach()
    print(f"\n{label}")
    print(f"{'solver':22s} {'<=λδ':>6s} {'<=2λδ':>6s} {'|gradG| θ':>10s} {'|gradG|':>8s} "
          f"{'steps':>6s} {'neg.c.':>6s} {'acc %':>6s} {'ms/task':>8s}")
    best = {}
    with torch.no_grad():
        for name, solver in SOLVERS.items():
            res, ms, acc = solve_tasks(solver, method, model, theta, tasks)
            best[name] = (sum(r.grad_norm <= lo for r in res), sum(r.grad_norm <= hi for r in res),
                          -sum(r.grad_norm for r in res))
            print(solver_row(name, res, ms, acc, lo, hi), flush=True)
    name = max(best, key=best.get)
    print(f"meta-gradient after {name}, MINRES on the exact Hessian:")
    print(f"{'MINRES iterations':18s} {'residual ratio mean':>20s} {'max':>6s} {'s/task':>7s}")
    for iters in (5, 10):
        m = IMAML(lam=LAM, inner=SOLVERS[name], linear_solver="minres", cg_max_iter=iters,
                  curvature="hessian")
        m.meta_gradient(model, theta, tasks[0])  # warm-up
        t0 = time.perf_counter()
        out = [m.meta_gradient(model, theta, t) for t in tasks]
        s = (time.perf_counter() - t0) / len(tasks)
        ratios = [mg.cg.residual_norms[-1] / mg.cg.residual_norms[0] for mg in out]
        print(f"{iters:<18d} {sum(ratios) / len(ratios):20.3f} {max(ratios):6.3f} {s:7.2f}",
              flush=True)
