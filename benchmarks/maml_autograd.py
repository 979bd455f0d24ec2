"""MAML's meta-gradient: this library against plain ``torch.autograd``, side by side.

One Omniglot 5-way 1-shot task (5 support images, 5 queries per class, the Conv-4 of 64
filters), K inner steps of gradient descent (lr 0.4) differentiated through, one thread:

- ``imaml``: ``MAML(inner=GradientDescent(lr, K)).meta_gradient(model, theta, task)``;
- ``autograd``: the textbook loop on the module's parameter dict, ``functional_call`` and
  ``torch.autograd.grad(create_graph=True)`` per step, then one ``autograd.grad`` of the query
  loss with respect to the meta-parameters.

Both compute the same meta-gradient (checked here to float32 rounding). Each figure is the
median of ``--reps`` timed calls after a warm-up, the two alternating so that a change in the
machine's state affects both. Prints a table and writes JSON.

    python benchmarks/maml_autograd.py --out docs/benchmarks/maml_autograd.json
"""
import argparse
import json
import platform
import statistics
import time

import torch
from torch.func import functional_call

from imaml import MAML, FunctionalModel, GradientDescent, Task, omniglot_conv4


def make_task(ways=5, shots=1, queries=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Task(torch.randn(ways * shots, 1, 28, 28, generator=g),
                torch.arange(ways).repeat(shots),
                torch.randn(ways * queries, 1, 28, 28, generator=g),
                torch.arange(ways).repeat(queries))


def autograd_maml(module, params, buffers, task, lr, steps):
    """The meta-gradient of L_query(φ_K) with respect to ``params`` (a dict that requires
    grad), by back-prop through K steps of φ ← φ − lr ∇L_support(φ)."""
    loss_fn = torch.nn.functional.cross_entropy
    phi = dict(params)
    for _ in range(steps):
        loss = loss_fn(functional_call(module, (phi, buffers), (task.x_support,)), task.y_support)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads)}
    loss = loss_fn(functional_call(module, (phi, buffers), (task.x_query,)), task.y_query)
    return torch.autograd.grad(loss, list(params.values()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 25])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--out", default="results/maml_autograd.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = omniglot_conv4(5)
    fm = FunctionalModel(module)
    theta = fm.theta()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    task = make_task()
    rows = []
    for k in args.steps:
        method = MAML(inner=GradientDescent(lr=args.lr, steps=k))
        ours = lambda: method.meta_gradient(fm, theta, task).grad  # noqa: E731
        plain = lambda: autograd_maml(module, params, buffers, task, args.lr, k)  # noqa: E731
        a, b = ours(), fm.flatten(list(plain()))  # warm-up, and the same meta-gradient
        diff = float((a - b).norm() / b.norm())
        times = {"imaml": [], "autograd": []}
        for _ in range(args.reps):
            for name, fn in (("imaml", ours), ("autograd", plain)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {n: statistics.median(t) for n, t in times.items()}
        rows.append({"steps": k, "imaml_s": med["imaml"], "autograd_s": med["autograd"],
                     "ratio": med["imaml"] / med["autograd"], "relative_difference": diff,
                     "times": times})
    print(f"MAML meta-gradient, one Omniglot 5-way 1-shot task, lr {args.lr}, 1 thread, median "
          f"of {args.reps}")
    print("| inner steps K | imaml (s) | plain autograd (s) | imaml / autograd | meta-gradients differ by |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['imaml_s']:.4f} | {r['autograd_s']:.4f} | {r['ratio']:.3f} | "
              f"{r['relative_difference']:.1e} |")
    info = {"torch": torch.__version__, "machine": platform.machine(), "lr": args.lr,
            "reps": args.reps, "threads": 1, "rows": rows}
    import os
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
