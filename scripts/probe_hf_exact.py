"""Can Newton-CG with the exact Hessian solve iMAML's inner problems (λ 2, ‖∇G‖ ≤ 0.1) as cheaply
as gradient descent with Barzilai–Borwein steps? On 16 fixed Omniglot 5-way 1-shot meta-val
tasks of an early, a middle and a final checkpoint, one thread: the fraction of solves that
reach the tolerance, mean ‖∇G‖ at the end, Newton steps, line-search evaluations, Newton
systems that met negative curvature, and milliseconds per task, for Newton-CG (steps x CG
iterations, undamped = Steihaug, or Levenberg–Marquardt damped from μ₀) and the BB solver of
the iMAML-GD 2-hour row; then the seconds of a whole meta-gradient (inner solve + 5 MINRES) of
a meta-batch of 16 of these tasks, task by task and under vmap (imaml.batched). Output: docs/benchmarks/probe_hf_exact.txt (RESULTS.md, iMAML-HF).
Run from the repository root with IMAML_DATA set: python scripts/probe_hf_exact.py"""
import time

import torch

from imaml import IMAML, GradientDescent, NewtonCG
from imaml.batched import batch_meta_gradient
from imaml.checkpoint import MetaModel
from imaml.train import load_config, task_sampler

torch.set_num_threads(1)
CHECKPOINTS = {
    "early (iMAML-HF exact trial, 225 its, 76% test)": "docs/runs/trials_o5w1s/hf_exact_6min/best.pt",
    "middle (iMAML-GD BB, 491 its, 93.9% test)": "docs/runs/o5w1s_lam_fixed_12min/best.pt",
    "final (iMAML-GD BB 2-hour row, 6250 its, 98.7% test)": "docs/runs/o5w1s_imaml_gd_bb_cpu2h/best.pt",
}
SOLVERS = {
    "newton 5x5": NewtonCG(steps=5, cg_iters=5, tol=0.05),
    "newton 5x5 damped 1": NewtonCG(steps=5, cg_iters=5, tol=0.05, damping=1.0),
    "newton 10x5 damped 1": NewtonCG(steps=10, cg_iters=5, tol=0.05, damping=1.0),
    "newton 20x3": NewtonCG(steps=20, cg_iters=3, tol=0.05),
    "newton 20x3 damped 1": NewtonCG(steps=20, cg_iters=3, tol=0.05, damping=1.0),
    "newton 20x3 damped 10": NewtonCG(steps=20, cg_iters=3, tol=0.05, damping=10.0),
    "GD BB 24 (iMAML-GD row)": GradientDescent(lr=0.002, steps=24, adaptive=True, step_rule="bb",
                                               tol=0.05),
}
cfg = load_config("configs/omniglot_5w1s_imaml_hf_exact_cpu2h.json", [])
sampler = task_sampler(cfg, "meta_val", 5, cfg.seed + 1, lambda m: None)
tasks = [sampler.sample(i) for i in range(16)]
method = IMAML(lam=2.0, curvature="hessian")
print(f"{len(tasks)} meta-val tasks, λ 2, tolerance ‖∇G‖ ≤ 0.1, torch {torch.__version__}, 1 thread")
with torch.no_grad():
    for label, path in CHECKPOINTS.items():
        mm = MetaModel.load(path)
        theta = mm.model.theta().detach()
        print(f"\n{label}: {path}")
        print(f"{'solver':26s} {'solved':>7s} {'mean |gradG|':>12s} {'steps':>6s} "
              f"{'evals':>6s} {'neg.curv.':>9s} {'ms/task':>8s}")
        for name, solver in SOLVERS.items():
            solver.solve(method.problem(mm.model, theta, tasks[0]), theta)  # warm-up
            t0 = time.perf_counter()
            res = [solver.solve(method.problem(mm.model, theta, t), theta) for t in tasks]
            ms = 1000 * (time.perf_counter() - t0) / len(tasks)
            n = len(res)
            print(f"{name:26s} {sum(r.converged for r in res):3d}/{n:<3d} "
                  f"{sum(r.grad_norm for r in res) / n:12.3f} {sum(r.steps for r in res) / n:6.1f} "
                  f"{sum(r.evaluations for r in res) / n:6.1f} "
                  f"{sum(r.negative_curvature for r in res) / n:9.1f} {ms:8.0f}", flush=True)

        print(f"{'meta-gradient of 16 tasks':26s} {'loop s':>7s} {'vmap s':>7s}")
        batch = sampler.batch(range(16))
        for name in ("newton 5x5", "newton 5x5 damped 1", "GD BB 24 (iMAML-GD row)"):
            m = IMAML(lam=2.0, inner=SOLVERS[name], linear_solver="minres", cg_max_iter=5)
            secs = []
            for mode in ("loop", "vmap"):
                run = ((lambda: [m.meta_gradient(mm.model, theta, t) for t in batch.tasks()])
                       if mode == "loop" else lambda: batch_meta_gradient(m, mm.model, theta, batch))
                with torch.enable_grad():
                    run()  # warm-up
                    t0 = time.perf_counter()
                    run()
                secs.append(time.perf_counter() - t0)
            print(f"{name:26s} {secs[0]:7.2f} {secs[1]:7.2f}", flush=True)
