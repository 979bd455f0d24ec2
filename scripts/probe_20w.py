"""Which inner solver solves iMAML's proximal problem on Omniglot 20-way 1-shot (λ 2) to
‖∇G‖ ≤ λδ, and at what cost? On 16 fixed meta-val tasks, one thread: for a fresh network and
for the checkpoints given on the command line (for example an early and the best model of a
20-way run), the fraction of solves within λδ for δ 0.05 and 0.1, mean ‖∇G‖ at θ and at the
end, steps, negative-curvature systems, query accuracy after the solve and milliseconds per
task of each candidate (Barzilai–Borwein GD, growth-rule GD, Nesterov, damped Newton-CG); then
the seconds of a whole meta-gradient (inner solve + 5 MINRES) of a meta-batch of 16 tasks,
task by task and vmapped (imaml.batched), for the candidates that solved best.
Run from the repository root with IMAML_DATA set:
    python scripts/probe_20w.py [--no-fresh] [--no-timing] [--hf] [LABEL=CHECKPOINT ...]
(--no-fresh: skip the fresh network; --no-timing: skip the meta-gradient timings; --hf: the
damped Newton-CG candidates for an iMAML-HF config instead).
Output kept in docs/benchmarks/probe_20w.txt."""
import sys
import time

import torch

from imaml import IMAML, FunctionalModel, GradientDescent, Nesterov, NewtonCG
from imaml.batched import batch_meta_gradient
from imaml.checkpoint import MetaModel, build_network
from imaml.train import load_config, task_sampler
from probe_common import solve_tasks, solver_row

torch.set_num_threads(1)
LAM = 2.0
SOLVERS = {
    "GD BB 25 from .002": GradientDescent(lr=0.002, steps=25, adaptive=True, step_rule="bb",
                                          tol=0.05),
    "GD BB 25 from .02": GradientDescent(lr=0.02, steps=25, adaptive=True, step_rule="bb",
                                         tol=0.05),
    "GD BB 50 from .002": GradientDescent(lr=0.002, steps=50, adaptive=True, step_rule="bb",
                                          tol=0.05),
    "GD grow 25 from .1": GradientDescent(lr=0.1, steps=25, adaptive=True, tol=0.05),
    "Nesterov 25 from .05": Nesterov(lr=0.05, momentum=0.9, steps=25, adaptive=True, tol=0.05,
                                     report=True),
    "Newton 20x3 damped 1": NewtonCG(steps=20, cg_iters=3, tol=0.05, damping=1.0),
    "Newton 10x5 damped 1": NewtonCG(steps=10, cg_iters=5, tol=0.05, damping=1.0),
}
TIMED = ("GD BB 25 from .002", "GD BB 50 from .002", "Newton 20x3 damped 1")
# --hf: the Newton-CG candidates for an iMAML-HF 20-way config, with the damping that solved
# Mini-ImageNet's problems (10) and the GD config's solver beside them for reference
HF_SOLVERS = {
    "GD BB 25 from .002": SOLVERS["GD BB 25 from .002"],
    "Newton 20x3 damped 10": NewtonCG(steps=20, cg_iters=3, tol=0.05, damping=10.0),
    "Newton 30x3 damped 10": NewtonCG(steps=30, cg_iters=3, tol=0.05, damping=10.0),
    "Newton 20x5 damped 10": NewtonCG(steps=20, cg_iters=5, tol=0.05, damping=10.0),
    "Newton 20x3 damped 3": NewtonCG(steps=20, cg_iters=3, tol=0.05, damping=3.0),
}
HF_TIMED = ("GD BB 25 from .002", "Newton 20x3 damped 10")

cfg = load_config("configs/omniglot_20w1s_maml_cpu2h.json", [])
sampler = task_sampler(cfg, "meta_val", 5, cfg.seed + 1, lambda m: None)
tasks = [sampler.sample(i) for i in range(16)]
method = IMAML(lam=LAM, curvature="hessian")


FLAGS = {a for a in sys.argv[1:] if a.startswith("--")}
if "--hf" in FLAGS:
    SOLVERS, TIMED = HF_SOLVERS, HF_TIMED


def models():
    torch.manual_seed(cfg.seed)
    if "--no-fresh" not in FLAGS:
        yield "fresh network (seed of the runs)", FunctionalModel(build_network("omniglot", 20))
    for arg in (a for a in sys.argv[1:] if not a.startswith("--")):
        label, _, path = arg.rpartition("=")
        mm = MetaModel.load(path)
        yield f"{label or path} ({path}, iteration {mm.info.get('iteration')})", mm.model


print(f"Omniglot 20-way 1-shot, {len(tasks)} meta-val tasks (5 queries per class), λ {LAM}, "
      f"tolerance ‖∇G‖ ≤ λδ with δ 0.05 (0.1) and δ 0.1 (0.2); torch {torch.__version__}, "
      f"1 thread")
with torch.no_grad():
    for label, model in models():
        theta = model.theta().detach()
        print(f"\n{label}")
        print(f"{'solver':22s} {'<=0.1':>6s} {'<=0.2':>6s} {'|gradG| θ':>10s} {'|gradG|':>8s} "
              f"{'steps':>6s} {'neg.c.':>6s} {'acc %':>6s} {'ms/task':>8s}")
        for name, solver in SOLVERS.items():
            res, ms, acc = solve_tasks(solver, method, model, theta, tasks)
            print(solver_row(name, res, ms, acc, 0.1, 0.2), flush=True)

        if "--no-timing" in FLAGS:
            continue
        print(f"{'meta-gradient of 16':22s} {'loop s':>7s} {'vmap s':>7s}")
        batch = sampler.batch(range(16))
        for name in TIMED:
            m = IMAML(lam=LAM, inner=SOLVERS[name], linear_solver="minres", cg_max_iter=5)
            secs = []
            for mode in ("loop", "vmap"):
                run = ((lambda: [m.meta_gradient(model, theta, t) for t in batch.tasks()])
                       if mode == "loop" else lambda: batch_meta_gradient(m, model, theta, batch))
                with torch.enable_grad():
                    run()  # warm-up
                    t0 = time.perf_counter()
                    run()
                secs.append(time.perf_counter() - t0)
            print(f"{name:22s} {secs[0]:7.2f} {secs[1]:7.2f}", flush=True)
