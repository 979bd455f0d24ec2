"""What the inner-solver probes (probe_20w.py, probe_mini.py) share: solving a fixed set of tasks'
proximal problems from θ with one candidate solver, and the table row that reports it."""
import time


def solve_tasks(solver, method, model, theta, tasks):
    """Each task's proximal problem solved from θ, after one warm-up solve of the first:
    (the solver results, milliseconds per task, the query accuracy after each solve)."""
    solver.solve(method.problem(model, theta, tasks[0]), theta)  # warm-up
    t0 = time.perf_counter()
    res = [solver.solve(method.problem(model, theta, t), theta) for t in tasks]
    ms = 1000 * (time.perf_counter() - t0) / len(tasks)
    acc = [float((model.forward(r.phi, t.x_query).argmax(-1) == t.y_query).float().mean())
           for r, t in zip(res, tasks)]
    return res, ms, acc


def solver_row(name, res, ms, acc, lo, hi) -> str:
    """One row of the probes' table: solves within ``lo`` and within ``hi``, mean ‖∇G‖ at θ and
    at the end, steps, negative-curvature systems, query accuracy (%) and ms per task."""
    n = len(res)
    g0 = sum(r.grad_norms[0] for r in res if r.grad_norms) / n
    return (f"{name:22s} {sum(r.grad_norm <= lo for r in res):3d}/{n:<2d} "
            f"{sum(r.grad_norm <= hi for r in res):3d}/{n:<2d} {g0:10.3f} "
            f"{sum(r.grad_norm for r in res) / n:8.3f} {sum(r.steps for r in res) / n:6.1f} "
            f"{sum(r.negative_curvature for r in res) / n:6.1f} {100 * sum(acc) / n:6.1f} "
            f"{ms:8.0f}")
