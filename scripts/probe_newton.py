"""Why iMAML-HF's time grows faster than its number of Newton steps in `imaml bench` (README,
"The benchmark, measured"): on the benchmark's random-input Omniglot 5-way 1-shot task (λ 2,
5 CG steps per Newton direction) print, after 0/10/25/50/100 Newton steps, G, ‖∇G‖ and the
objective evaluations the backtracking line search has used so far; the line search starts
at the unit step (as `NewtonCG` does) or at twice the last accepted step ("warm"). Then
‖∇G‖ along 300 steps of plain gradient descent on the same problem, for comparison.
Run from the repository root: python scripts/probe_newton.py"""
import torch

from imaml import IMAML, GradientDescent
from imaml.bench import workload
from imaml.linear import conjugate_gradient

torch.set_num_threads(1)
torch.manual_seed(0)
fm, theta, batch = workload("omniglot", 5, 1, 5)
theta = theta.detach()


def problem(curvature):
    return IMAML(lam=2.0, curvature=curvature).problem(fm, theta, batch[0])


for curvature in ("hessian", "ggn"):
    for warm in (False, True):
        prob, phi, t_prev, evals = problem(curvature), theta, 1.0, 0
        with torch.no_grad():
            for k in range(101):
                f, g = prob.value_and_grad(phi)
                if k in (0, 10, 25, 50, 100):
                    print(f"{curvature:7s} {'warm' if warm else 'unit'} Newton step {k:3d}: G {float(f):.5f}"
                          f"  |grad G| {float(g.norm()):.3f}  line-search evaluations so far {evals}")
                if k == 100:
                    break
                cg = conjugate_gradient(prob.hvp(phi, "rev-rev"), -g, max_iter=5)
                d, slope = cg.x, float(g @ cg.x)
                if cg.breakdown or not slope < 0:
                    d, slope = -g, -float(g @ g)
                t = min(1.0, 2 * t_prev) if warm else 1.0
                for _ in range(40):
                    evals += 1
                    ft = prob.value(phi + t * d)
                    if torch.isfinite(ft) and ft <= f + 1e-4 * t * slope:
                        break
                    t *= 0.5
                phi, t_prev = phi + t * d, t
for lr in (0.1, 0.03):
    prob = problem("hessian")
    with torch.no_grad():
        r = GradientDescent(lr=lr, steps=300).solve(prob, theta)
    norms = ", ".join(f"{r.grad_norms[k]:.3f}" for k in (0, 10, 25, 50, 100, 299))
    print(f"gradient descent lr {lr}: |grad G| after 0/10/25/50/100/299 steps: {norms}")
