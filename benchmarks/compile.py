"""Does ``torch.compile`` make the small-task path faster? Times the two kernels an iMAML task
spends its time in, eager and compiled (inductor, ``dynamic=False``), on the Omniglot 5-way
1-shot workload of ``imaml bench`` (random inputs): one inner gradient step φ − lr∇G(φ), for one
task and vmapped over a meta-batch of 16, and one Hessian-vector product (forward-over-reverse,
which compiles as one graph; the library's default reverse-over-reverse reuses a graph built
outside the product).

    python benchmarks/compile.py --out docs/benchmarks/compile [--threads 2]

Prints milliseconds per call (median of --reps after warm-up; the compile time is reported
separately) and writes compile.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp, vmap

from imaml.bench import workload


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    fm, theta, batch = workload("omniglot", 5, 1, 1, tasks=16)
    names, shapes = fm.names, [p.shape for p in fm.module.parameters()]
    numels = [s.numel() for s in shapes]
    lam, lr = 2.0, 0.1

    def loss(phi, x, y):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(phi, numels), shapes)}
        return torch.nn.functional.cross_entropy(functional_call(fm.module, params, (x,)), y)

    def g_of(phi, x, y, th):
        return grad(loss)(phi, x, y) + lam * (phi - th)

    def step(phi, x, y, th):
        return phi - lr * g_of(phi, x, y, th)

    def hvp(phi, v, x, y, th):
        return jvp(lambda p: g_of(p, x, y, th), (phi,), (v,))[1]

    x1, y1 = batch.x_support[0], batch.y_support[0]
    th = theta.detach()
    xs, ys = batch.x_support, batch.y_support
    v = torch.randn_like(th)
    kernels = {
        "inner step, one task": (step, (th, x1, y1, th)),
        "inner step, vmap x16": (vmap(step, in_dims=(None, 0, 0, None)), (th, xs, ys, th)),
        "HVP (fwd-rev), one task": (hvp, (th, v, x1, y1, th)),
    }
    rows = []
    for name, (fn, args) in kernels.items():
        eager = median_ms(lambda: fn(*args), a.reps)
        compiled = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        try:
            ref, out = fn(*args), compiled(*args)
            err = float((out - ref).norm() / ref.norm())
            compile_s = time.perf_counter() - t0
            comp = median_ms(lambda: compiled(*args), a.reps)
            note = ""
        except Exception as e:  # a transform inductor cannot compile: say so, go on
            comp, compile_s, err, note = float("nan"), time.perf_counter() - t0, float("nan"), \
                f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append({"kernel": name, "eager_ms": eager, "compiled_ms": comp,
                     "compile_seconds": compile_s, "relative_difference": err, "error": note,
                     "threads": torch.get_num_threads()})
        print(f"{name:26s} eager {eager:8.2f} ms  compiled {comp:8.2f} ms  "
              f"(compile {compile_s:.0f} s, relative difference {err:.1e}) {note}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "compile.json").write_text(json.dumps({"torch": torch.__version__,
                                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
