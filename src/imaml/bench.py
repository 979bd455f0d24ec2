"""Time and peak memory of task meta-gradients on the paper's networks (``imaml bench``).

Each figure comes from a fresh Python process: time as the median of ``reps`` calls after one
warm-up call, memory as the peak RSS of one call above the RSS just before it (see
``imaml.profiling``). Inputs are random images: cost does not depend on pixel values.
Modes: ``task`` (one task meta-gradient), ``loop`` (a meta-batch, task by task) and ``vmap``
(a meta-batch in one vmapped call, ``imaml.batched``).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .checkpoint import build_network
from .functional import FunctionalModel
from .inner import GradientDescent, NewtonCG
from .meta import IMAML, MAML

METHODS = ("imaml-gd", "imaml-hf", "maml")
WORKLOADS = {  # name: (dataset, ways, shots, queries per class)
    "omniglot-5w1s": ("omniglot", 5, 1, 1),
    "omniglot-20w5s": ("omniglot", 20, 5, 5),
    "miniimagenet-5w1s": ("miniimagenet", 5, 1, 15),
}
MODES = ("task", "loop", "vmap")


def make_method(name: str, steps: int, lam: float = 2.0, lr: float = 0.1, cg_max_iter: int = 5):
    """The benchmarked methods, with the settings of REFERENCE.md's speed table (K = inner GD
    steps; for iMAML-HF, K = Newton steps of 5 CG iterations each)."""
    if name == "imaml-gd":
        return IMAML(lam=lam, inner=GradientDescent(lr=lr, steps=steps), cg_max_iter=cg_max_iter)
    if name == "imaml-hf":
        return IMAML(lam=lam, inner=NewtonCG(steps=steps, cg_iters=5), cg_max_iter=cg_max_iter)
    if name == "maml":
        return MAML(inner=GradientDescent(lr=lr, steps=steps))
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")


def workload(dataset: str, ways: int, shots: int, query: int, tasks: int = 1, seed: int = 0):
    """(FunctionalModel, θ, TaskBatch of ``tasks`` tasks) with random inputs."""
    from .data.sampler import TaskBatch
    g = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if dataset == "omniglot" else (3, 84, 84)
    fm = FunctionalModel(build_network(dataset, ways))
    labels = torch.arange(ways)
    batch = TaskBatch(torch.randn(tasks, ways * shots, *shape, generator=g),
                      labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
                      torch.randn(tasks, ways * query, *shape, generator=g),
                      labels.repeat_interleave(query).expand(tasks, -1).contiguous())
    return fm, fm.theta(), batch


def _call(spec: Dict):
    from .batched import batch_meta_gradient
    torch.manual_seed(0)
    dataset, ways, shots, query = WORKLOADS[spec["workload"]]
    tasks = 1 if spec["mode"] == "task" else spec["batch"]
    fm, theta, batch = workload(dataset, ways, shots, query, tasks)
    method = make_method(spec["method"], spec["steps"])
    if spec["mode"] == "vmap":
        return lambda: batch_meta_gradient(method, fm, theta, batch)
    items = batch.tasks()
    return lambda: [method.meta_gradient(fm, theta, t) for t in items]


def measure(spec: Dict) -> Dict:
    """In this process, after one warm-up call: the median time of ``reps`` calls
    (``spec['what'] == 'time'``) or the peak memory of one call (``'memory'``)."""
    from .profiling import median_time, peak_memory
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    call = _call(spec)
    call()
    if spec["what"] == "memory":
        return {"peak_mib": peak_memory(call)[1]}
    med, times = median_time(call, reps=spec.get("reps", 3), warmup=0)
    return {"seconds": med, "times": times, "threads": torch.get_num_threads()}


# glibc keeps freed memory for reuse, which hides a call's own peak from the RSS high-water mark;
# a fixed mmap threshold makes every large tensor an mmap that is returned at once. That slows
# allocation, so time is measured in a separate process with the default allocator.
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_in_subprocess(spec: Dict, memory: bool = True) -> Dict:
    """Time (and peak memory) of ``spec``, each measured in a fresh Python process."""
    row = dict(spec)
    for what, extra_env in (("time", {}), ("memory", _MEMORY_ENV))[: 2 if memory else 1]:
        out = subprocess.run([sys.executable, "-m", "imaml.bench", json.dumps({**spec, "what": what})],
                             env=dict(os.environ, **extra_env), capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {spec}:\n{out.stderr[-2000:]}")
        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return row


def sweep(methods: List[str], steps: List[int], workload_name: str = "omniglot-20w5s",
          mode: str = "task", batch: int = 16, reps: int = 3, memory: bool = True,
          threads: Optional[int] = None, progress=print) -> List[Dict]:
    rows = []
    for m in methods:
        for k in steps:
            row = measure_in_subprocess(dict(workload=workload_name, method=m, steps=k, mode=mode,
                                             batch=batch, reps=reps, threads=threads), memory)
            mem = f"{row['peak_mib']:9.1f} MiB" if "peak_mib" in row else ""
            progress(f"  {workload_name:>17} {mode:>4} {m:>9} K={k:<4} {row['seconds']:8.3f} s  {mem}")
            rows.append(row)
    return rows


def machine() -> Dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table(rows: List[Dict]) -> str:
    """A Markdown table of sweep rows."""
    lines = ["| workload | mode | method | K | seconds | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"
        mode = r["mode"] if r["mode"] == "task" else f"{r['mode']} x{r['batch']}"
        lines.append(f"| {r['workload']} | {mode} | {r['method']} | {r['steps']} | "
                     f"{r['seconds']:.3f} | {mem} |")
    return "\n".join(lines)


def run(out_dir: str, workloads: List[str], methods: List[str], steps: List[int], batch: int,
        reps: int, modes: List[str], threads: Optional[int] = None, progress=print) -> Dict:
    """The benchmark suite: every (workload, mode, method, K); JSON, Markdown and a plot."""
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {MODES}")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for w in workloads:
        for mode in modes:
            ms = [m for m in methods if not (mode == "vmap" and m == "imaml-hf")]
            rows += sweep(ms, steps, w, mode, batch, reps, threads=threads, progress=progress)
    res = {"machine": machine(), "batch": batch, "reps": reps, "threads": threads, "rows": rows}
    with open(os.path.join(out_dir, "bench.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as fh:
        fh.write(table(rows) + "\n")
    _plot(rows, os.path.join(out_dir, "bench.png"))
    progress(table(rows))
    return res


def _plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["workload"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 6.5), squeeze=False)
    for j, (w, mode) in enumerate(groups):
        for m in sorted({r["method"] for r in rows}):
            rs = [r for r in rows if r["workload"] == w and r["mode"] == mode and r["method"] == m]
            if not rs:
                continue
            ks = [r["steps"] for r in rs]
            axes[0, j].plot(ks, [r["seconds"] for r in rs], marker="o", label=m)
            axes[1, j].plot(ks, [r.get("peak_mib", float("nan")) for r in rs], marker="o", label=m)
        axes[0, j].set_title(f"{w}, {mode}", fontsize=9)
        axes[1, j].set_xlabel("inner steps K")
        axes[0, j].set_ylabel("seconds")
        axes[1, j].set_ylabel("peak MiB above baseline")
        for i in (0, 1):
            axes[i, j].grid(alpha=0.3)
            axes[i, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
