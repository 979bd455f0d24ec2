"""Time and memory of one task meta-gradient on the paper's networks, one fresh process per figure.

Used by ``imaml synthetic`` (part b, compute and memory) and by ``benchmarks/``. Inputs are random
images: cost does not depend on pixel values.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import torch

from .functional import FunctionalModel
from .inner import GradientDescent, NewtonCG
from .meta import IMAML, MAML, Task
from .models import miniimagenet_conv4, omniglot_conv4
from .profiling import median_time, peak_memory

METHODS = ("imaml-gd", "imaml-hf", "maml")


def make_method(name: str, steps: int, lam: float = 2.0, lr: float = 0.1, cg_max_iter: int = 5):
    """The benchmarked methods, with the settings of REFERENCE.md's speed table."""
    if name == "imaml-gd":
        return IMAML(lam=lam, inner=GradientDescent(lr=lr, steps=steps), cg_max_iter=cg_max_iter)
    if name == "imaml-hf":
        return IMAML(lam=lam, inner=NewtonCG(steps=steps, cg_iters=5), cg_max_iter=cg_max_iter)
    if name == "maml":
        return MAML(inner=GradientDescent(lr=lr, steps=steps))
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")


def workload(dataset: str, ways: int, shots: int, query: int, seed: int = 0):
    """(FunctionalModel, θ, Task) with random inputs for the dataset's Conv-4."""
    g = torch.Generator().manual_seed(seed)
    if dataset == "omniglot":
        net, shape = omniglot_conv4(ways), (1, 28, 28)
    elif dataset == "miniimagenet":
        net, shape = miniimagenet_conv4(ways), (3, 84, 84)
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    fm = FunctionalModel(net)
    labels = torch.arange(ways)
    task = Task(torch.randn(ways * shots, *shape, generator=g), labels.repeat_interleave(shots),
                torch.randn(ways * query, *shape, generator=g), labels.repeat_interleave(query))
    return fm, fm.theta(), task


def measure(spec: Dict) -> Dict:
    """In this process, after one warm-up call: the median time of ``reps`` calls
    (``spec['what'] == 'time'``) or the peak memory of one call (``'memory'``)."""
    torch.manual_seed(0)
    fm, theta, task = workload(spec["dataset"], spec["ways"], spec["shots"], spec["query"])
    method = make_method(spec["method"], spec["steps"])
    call = lambda: method.meta_gradient(fm, theta, task)  # noqa: E731
    call()
    if spec["what"] == "memory":
        return {"peak_mib": peak_memory(call)[1]}
    med, times = median_time(call, reps=spec.get("reps", 3), warmup=0)
    return {"seconds": med, "times": times, "threads": torch.get_num_threads()}


# glibc keeps freed memory for reuse, which hides a call's own peak from the RSS high-water mark;
# a fixed mmap threshold makes every large tensor an mmap that is returned at once. That slows
# allocation, so time is measured in a separate process with the default allocator.
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_in_subprocess(spec: Dict) -> Dict:
    """Time and peak memory of ``spec``, each measured in a fresh Python process."""
    row = dict(spec)
    for what, extra_env in (("time", {}), ("memory", _MEMORY_ENV)):
        out = subprocess.run([sys.executable, "-m", "imaml.bench", json.dumps({**spec, "what": what})],
                             env=dict(os.environ, **extra_env), capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {spec}:\n{out.stderr[-2000:]}")
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return row


def sweep(methods: List[str], steps: List[int], dataset="omniglot", ways=20, shots=5, query=5,
          reps=3, progress=print) -> List[Dict]:
    rows = []
    for m in methods:
        for k in steps:
            row = measure_in_subprocess(dict(method=m, steps=k, dataset=dataset, ways=ways,
                                             shots=shots, query=query, reps=reps))
            progress(f"  {m:>9} K={k:<4} {row['seconds']:8.3f} s  {row['peak_mib']:9.1f} MiB")
            rows.append(row)
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
