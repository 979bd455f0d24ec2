"""How far 16 or 32 adaptive GD steps and 16 adaptive Nesterov steps take the inner problem of
a checkpoint on 20 meta-val tasks (RESULTS.md, exact-Hessian row). Run from the repository root
with IMAML_DATA set: python scripts/probe_inner_steps.py CHECKPOINT"""
import torch, time, sys
from imaml import FunctionalModel
from imaml.checkpoint import build_network, load_checkpoint
from imaml.data import TaskSampler, load_split
from imaml.inner import GradientDescent, Nesterov
from imaml.functional import ProximalProblem, task_loss
torch.set_num_threads(1)
net = build_network("omniglot", 5); fm = FunctionalModel(net)
ck = load_checkpoint(sys.argv[1]); net.load_state_dict(ck["state_dict"]); print("iteration", ck["iteration"])
classes = load_split("omniglot", "meta_val", None, progress=lambda m: None, kind="random")
s = TaskSampler(classes, 5, 1, 5, seed=1)
theta = fm.theta()
tasks = list(s.batch(range(20)).tasks())
for name, solver in [("agd .1 x16", GradientDescent(lr=.1, steps=16, adaptive=True)),
                     ("agd .1 x32", GradientDescent(lr=.1, steps=32, adaptive=True)),
                     ("anag .1 x16", Nesterov(lr=.1, momentum=.9, steps=16, adaptive=True, report=True)),
                     ("anag .1 x16 mu.7", Nesterov(lr=.1, momentum=.7, steps=16, adaptive=True, report=True)),
                     ]:
    t0 = time.time(); ns = []; rej = []; acc = []
    for t in tasks:
        p = ProximalProblem(task_loss(fm, t.x_support, t.y_support), theta, 2.0)
        with torch.no_grad():
            r = solver.solve(p, theta)
            acc.append(float((fm.forward(r.phi, t.x_query).argmax(-1) == t.y_query).float().mean()))
        ns.append(r.grad_norm); rej.append(r.rejected)
    ns = torch.tensor(ns)
    print(f"{name:18s} start {r.grad_norms[0]:.2f} mean {ns.mean():.3f} median {ns.median():.3f} max {ns.max():.3f} <=0.1: {(ns<=0.1).sum()}/20 rejected {sum(rej)/20:.1f} acc {100*sum(acc)/20:.1f} {time.time()-t0:.1f}s", flush=True)
