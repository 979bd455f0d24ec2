"""Time and peak memory of task meta-gradients on the paper's networks (``imaml bench``).

Each figure comes from a fresh Python process: time as the median of ``reps`` calls after a
warm-up call, memory as the peak RSS of one call above the RSS just before it (see
``imaml.profiling``), the median over ``mem_reps`` fresh processes for one task. The warm-up
call runs the same workload with one inner step: what a first call initialises (kernels for
these shapes, allocator pools) does not depend on the number of steps. Inputs are random
images: cost does not depend on pixel values. Modes: ``task`` (one task meta-gradient),
``loop`` (a meta-batch, task by task) and ``vmap`` (a meta-batch in one vmapped call,
``imaml.batched``). A sweep writes its JSON after every figure and, run again into the same
folder with the same settings, keeps the figures it has and measures only the missing ones.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .functional import FunctionalModel
from .records import plt as pyplot, write_json_atomic
from .registry import build_method, build_network

METHODS = ("imaml-gd", "imaml-hf", "maml")
WORKLOADS = {  # name: (dataset, ways, shots, queries per class)
    "omniglot-5w1s": ("omniglot", 5, 1, 1),
    "omniglot-20w5s": ("omniglot", 20, 5, 5),
    "miniimagenet-5w1s": ("miniimagenet", 5, 1, 15),
}
MODES = ("task", "loop", "vmap")
BATCH = {"omniglot-5w1s": 16, "omniglot-20w5s": 4, "miniimagenet-5w1s": 4}  # default meta-batch


def make_method(name: str, steps: int, lam: float = 2.0, lr: float = 0.1, cg_max_iter: int = 5):
    """The benchmarked methods (from the registry), with the settings the paper compares speed
    and memory at (K = inner GD steps; for iMAML-HF, K = Newton steps of 5 CG iterations each)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return build_method({"name": name, "lam": lam, "inner_lr": lr, "inner_steps": steps,
                         "hf_steps": steps, "cg_iters": 5, "cg_max_iter": cg_max_iter})


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


def _call(spec: Dict, steps: Optional[int] = None):
    from .batched import batch_meta_gradient
    torch.manual_seed(0)
    dataset, ways, shots, query = WORKLOADS[spec["workload"]]
    tasks = 1 if spec["mode"] == "task" else spec["batch"]
    fm, theta, batch = workload(dataset, ways, shots, query, tasks)
    method = make_method(spec["method"], steps or spec["steps"])
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
    _call(spec, steps=1)()  # warm-up
    call = _call(spec)
    if spec["what"] == "memory":
        return {"peak_mib": peak_memory(call)[1]}
    med, times = median_time(call, reps=spec.get("reps", 3), warmup=0)
    return {"seconds": med, "times": times, "torch_threads": torch.get_num_threads()}


# glibc keeps freed memory for reuse, which hides a call's own peak from the RSS high-water mark;
# a fixed mmap threshold makes every large tensor an mmap that is returned at once. That slows
# allocation, so time is measured in a separate process with the default allocator.
_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


class WorkerError(RuntimeError):
    """A measuring process failed; ``reason`` says how in one line."""

    def __init__(self, spec: Dict, returncode: int, stderr: str):
        killed = returncode == -9 or returncode == 137
        self.reason = ("killed by signal 9 (out of memory?)" if killed else
                       f"exit code {returncode}: " + (stderr.strip().splitlines() or [""])[-1][:200])
        super().__init__(f"benchmark worker failed for {spec}: {self.reason}\n{stderr[-2000:]}")


def _worker(spec: Dict, what: str) -> Dict:
    env = dict(os.environ, **(_MEMORY_ENV if what == "memory" else {}))
    out = subprocess.run([sys.executable, "-m", "imaml.bench", json.dumps({**spec, "what": what})],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise WorkerError(spec, out.returncode, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_subprocess(spec: Dict, memory: bool = True, mem_reps: int = 1) -> Dict:
    """Time of ``spec`` in a fresh process; with ``memory``, its peak memory in each of
    ``mem_reps`` further fresh processes (``peak_mib``: their median; ``peak_mibs``: all)."""
    row = dict(spec)
    row.update(_worker(spec, "time"))
    if memory:
        peaks = [_worker(spec, "memory")["peak_mib"] for _ in range(mem_reps)]
        row.update(peak_mib=statistics.median(peaks), peak_mibs=peaks)
    return row


def sweep(methods: List[str], steps: List[int], workload_name: str = "omniglot-20w5s",
          mode: str = "task", batch: int = 16, reps: int = 3, memory: bool = True,
          threads: Optional[int] = None, progress=print) -> List[Dict]:
    rows = []
    for m in methods:
        for k in steps:
            row = measure_in_subprocess(dict(workload=workload_name, method=m, steps=k, mode=mode,
                                             batch=batch, reps=reps, threads=threads), memory)
            progress(_line(row))
            rows.append(row)
    return rows


def _line(row: Dict) -> str:
    head = f"  {row['workload']:>17} {row['mode']:>4} {row['method']:>9} K={row['steps']:<4} "
    if "skipped" in row:
        return head + row["skipped"]
    mem = f"{row['peak_mib']:9.1f} MiB" if "peak_mib" in row else ""
    return head + f"{row['seconds']:8.3f} s  {mem}"


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("inf")


def machine() -> Dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table(rows: List[Dict]) -> str:
    """A Markdown table of sweep rows."""
    lines = ["| workload | mode | method | K | seconds | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        mode = r["mode"] if r["mode"] == "task" else f"{r['mode']} x{r['batch']}"
        if "skipped" in r:
            lines.append(f"| {r['workload']} | {mode} | {r['method']} | {r['steps']} | "
                         f"skipped: {r['skipped']} | - |")
            continue
        mem = f"{r['peak_mib']:.1f}" if "peak_mib" in r else "-"
        lines.append(f"| {r['workload']} | {mode} | {r['method']} | {r['steps']} | "
                     f"{r['seconds']:.3f} | {mem} |")
    return "\n".join(lines)


def grid(rows: List[Dict]) -> str:
    """A Markdown table with one line per (workload, mode, method) and one column per K:
    seconds and peak MiB of each figure."""
    ks = sorted({r["steps"] for r in rows})
    lines = ["| workload | mode | method | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    groups: Dict = {}
    for r in rows:
        mode = r["mode"] if r["mode"] == "task" else f"{r['mode']} x{r['batch']}"
        groups.setdefault((r["workload"], mode, r["method"]), {})[r["steps"]] = r
    for (w, mode, m), by_k in groups.items():
        cells = []
        for k in ks:
            r = by_k.get(k)
            if r is None:
                cells.append("")
            elif "skipped" in r:
                cells.append("skipped")
            else:
                mem = f", {r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""
                sec = f"{r['seconds']:.0f}" if r["seconds"] >= 100 else f"{r['seconds']:#.3g}"
                cells.append(f"{sec} s{mem}")
        lines.append(f"| {w} | {mode} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(rows: List[Dict]) -> str:
    """A Markdown table: peak memory at the fewest and the most inner steps measured, and their
    ratio, for each (workload, mode, method)."""
    lines = ["| workload | mode | method | K | peak MiB | K | peak MiB | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        if "peak_mib" in r:
            groups.setdefault((r["workload"], r["mode"], r["method"]), []).append(r)
    for (w, mode, m), rs in groups.items():
        lo, hi = min(rs, key=lambda r: r["steps"]), max(rs, key=lambda r: r["steps"])
        if lo is not hi:
            ratio = hi["peak_mib"] / lo["peak_mib"] if lo["peak_mib"] > 0 else float("nan")
            lines.append(f"| {w} | {mode} | {m} | {lo['steps']} | {lo['peak_mib']:.1f} | "
                         f"{hi['steps']} | {hi['peak_mib']:.1f} | {ratio:.2f}x |")
    return "\n".join(lines)


def _key(r: Dict):
    return (r["workload"], r["mode"], r["method"], r["steps"], r["batch"], r["reps"], r.get("threads"))


def _predicted_mib(spec: Dict, done: Dict, reps: int) -> float:
    """Predicted peak MiB of a figure, 0 when nothing is known: for a meta-batch, one task's
    peak times the batch (``vmap``) or once (``loop``), and, when the same meta-batch was
    measured at fewer steps, that peak scaled as one task's peak grows between the two K
    (MAML under ``vmap`` holds several times the batch times one task's peak)."""
    if spec["mode"] == "task":
        return 0.0
    task = lambda k: done.get(_key(dict(spec, mode="task", batch=1, reps=reps, steps=k)), {})  # noqa: E731
    one = task(spec["steps"]).get("peak_mib", 0.0)
    need = one * (spec["batch"] if spec["mode"] == "vmap" else 1)
    lower = [r for r in done.values() if "peak_mib" in r and r["steps"] < spec["steps"]
             and _key(dict(r, steps=spec["steps"])) == _key(spec)]
    if lower and one:
        prev = max(lower, key=lambda r: r["steps"])
        prev_one = task(prev["steps"]).get("peak_mib", 0.0)
        if prev_one > 0:
            need = max(need, prev["peak_mib"] * one / prev_one)
    return need


def run(out_dir: str, workloads: List[str], methods: List[str], steps: List[int],
        batch: Optional[int], reps: int, modes: List[str], threads: Optional[int] = None,
        mem_reps: int = 3, mem_limit_mib: Optional[float] = None, progress=print) -> Dict:
    """The benchmark suite: every (workload, mode, method, K); JSON, Markdown and a plot.

    ``batch``: tasks per meta-batch (None: ``BATCH`` of the workload). One task is timed over
    ``reps`` calls and its memory taken in ``mem_reps`` processes; a meta-batch is timed over one
    call and its memory taken in one process. A meta-batch whose predicted peak (``_predicted_mib``)
    exceeds ``mem_limit_mib`` (default: 80% of the memory available at the start) is skipped
    and listed as such, and so is a figure whose measuring process dies. ``bench.json`` is rewritten after
    every figure and keeps every figure it held (an interrupted sweep loses none); rows already
    in it for the same settings are kept, not measured again. The tables and the plot show
    this sweep's rows.
    """
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r}; choose from {sorted(WORKLOADS)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {MODES}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.json")
    done = {}
    if os.path.exists(path):
        try:
            with open(path) as fh:
                done = {_key(r): r for r in json.load(fh)["rows"]}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a bench.json ({e}); remove it or choose another --out") from None
        if done:
            progress(f"{path}: {len(done)} figures from an earlier run are kept where they match")
    limit = mem_limit_mib if mem_limit_mib is not None else 0.8 * _available_mib()
    res = {"machine": machine(), "reps": reps, "mem_reps": mem_reps, "threads": threads, "rows": []}

    def save():  # this sweep's rows, then every other figure the file held: nothing is lost
        mine = {_key(r) for r in res["rows"]}
        write_json_atomic(dict(res, rows=res["rows"] + [r for k, r in done.items() if k not in mine]),
                          path)

    for w in workloads:
        b = batch or BATCH[w]
        for mode in sorted(modes, key=MODES.index):  # one task first: it predicts batch memory
            for m in methods:
                for k in steps:
                    spec = dict(workload=w, method=m, steps=k, mode=mode, batch=b if mode != "task" else 1,
                                reps=reps if mode == "task" else 1, threads=threads)
                    row = done.get(_key(spec))
                    if row is None:
                        need = _predicted_mib(spec, done, reps)
                        if need > limit:
                            row = dict(spec, skipped=f"needs about {need:.0f} MiB, limit {limit:.0f} MiB")
                        else:
                            try:
                                row = measure_in_subprocess(spec, True, mem_reps if mode == "task" else 1)
                            except WorkerError as e:  # e.g. killed by the kernel for memory
                                row = dict(spec, skipped=f"worker failed: {e.reason}")
                        progress(_line(row))
                        done[_key(row)] = row
                    res["rows"].append(row)
                    save()
    with open(os.path.join(out_dir, "bench.md"), "w") as fh:
        fh.write(grid(res["rows"]) + "\n\nPeak memory against inner steps:\n\n"
                 + growth(res["rows"]) + "\n\nEvery figure:\n\n" + table(res["rows"]) + "\n")
    _plot([r for r in res["rows"] if "skipped" not in r], os.path.join(out_dir, "bench.png"))
    progress(grid(res["rows"]) + "\n\n" + growth(res["rows"]))
    return res


def _plot(rows: List[Dict], path: str) -> None:
    plt = pyplot()
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
