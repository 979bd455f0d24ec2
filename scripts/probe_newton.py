"""Why iMAML-HF's time grows faster than its number of Newton steps in `imaml bench` (docs/benchmarks.md,
"The benchmark, measured"): on the benchmark's random-input Omniglot 5-way 1-shot task (λ 2,
5 CG steps per Newton direction) print, after 10/25/50/100 Newton steps of `NewtonCG`, G,
‖∇G‖ and the objective evaluations its backtracking line search used, with the line search
started at the unit step every time ("unit", `warm_start=False`) or at twice the last
accepted step ("warm", the default since 2026-11-28). Then ‖∇G‖ along 300 steps of plain
gradient descent on the same problem, for comparison.
Run from the repository root: python scripts/probe_newton.py"""
import torch

from imaml import IMAML, GradientDescent, NewtonCG
from imaml.bench import workload

torch.set_num_threads(1)
torch.manual_seed(0)
fm, theta, batch = workload("omniglot", 5, 1, 5)
theta = theta.detach()


def problem(curvature):
    return IMAML(lam=2.0, curvature=curvature).problem(fm, theta, batch[0])


with torch.no_grad():
    for curvature in ("hessian", "ggn"):
        prob = problem(curvature)
        for warm in (False, True):
            for k in (10, 25, 50, 100):
                r = NewtonCG(steps=k, cg_iters=5, warm_start=warm, report=True).solve(prob, theta)
                print(f"{curvature:7s} {'warm' if warm else 'unit'} Newton steps {r.steps:3d}: "
                      f"G {float(prob.value(r.phi)):.5f}  |grad G| {r.grad_norm:.3f}  "
                      f"line-search evaluations {r.evaluations} ({r.stop_reason})")
    for lr in (0.1, 0.03):
        r = GradientDescent(lr=lr, steps=300).solve(problem("hessian"), theta)
        norms = ", ".join(f"{r.grad_norms[k]:.3f}" for k in (0, 10, 25, 50, 100, 299))
        print(f"gradient descent lr {lr}: |grad G| after 0/10/25/50/100/299 steps: {norms}")
