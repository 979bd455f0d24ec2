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
