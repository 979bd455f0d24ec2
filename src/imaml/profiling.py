"""Time and peak memory of one call, for benchmarks (never for assertions in tests).

Peak memory is the resident-set high-water mark above the RSS just before the call. On Linux
the mark is reset by writing 5 to /proc/self/clear_refs, so the figure is the call's own peak;
where that is not allowed the process-lifetime ``ru_maxrss`` is used instead, which is only
right in a fresh process whose earlier peak was lower (benchmarks measure memory in a fresh
process per figure for that reason).
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, List, Tuple


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object]) -> Tuple[object, float]:
    """Run ``fn`` once; return (its result, peak RSS above the pre-call RSS, in MiB)."""
    before = _status_kb("VmRSS")
    if _reset_peak():
        out = fn()
        peak = _status_kb("VmHWM")
    else:
        out = fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out, max(peak - before, 0) / 1024.0


def median_time(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> Tuple[float, List[float]]:
    """Median wall time of ``fn`` over ``reps`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system;
    True where it took effect (Linux with glibc), False elsewhere or when the environment sets
    ``IMAML_KEEP_FREED_MEMORY=0``. Process-wide: ``imaml train`` and ``imaml eval`` call it, the
    library does not.

    glibc serves every allocation above 32 MiB (the most its mmap threshold can grow to) with
    a fresh ``mmap`` and unmaps it on free, so the next tensor of that size is faulted in
    again page by page. A Mini-ImageNet Conv-4 meta-batch makes such tensors at every layer
    (80 images x 32 channels x 84 x 84 floats = 72 MiB): the iMAML-GD 2-hour config spent a
    quarter to a third of its CPU time in the kernel (``vmstat``: 25-32% system, 100,000 minor
    faults per second per process) and ran 32 iterations in 2 minutes; with ``M_MMAP_MAX = 0``
    (no mmap for allocations: the heap serves them) and no trimming of the heap it ran 46 and
    47 (1% system). The price is resident memory: freed memory stays with the process and the heap
    fragments (2.0 GB per process after 17 minutes of that run against 1.4 GB after 3 minutes
    without). Not used by the benchmarks, whose memory figures are differences of resident set
    sizes and would then miss reused memory.
    """
    import ctypes
    import ctypes.util
    import os
    import sys
    if (os.environ.get("IMAML_KEEP_FREED_MEMORY", "1") == "0"
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
