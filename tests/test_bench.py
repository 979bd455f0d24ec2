"""imaml bench: each figure from fresh processes, the JSON kept after every figure and reused
when the sweep runs again, and meta-batches that cannot fit in memory skipped, not crashed."""
import json

import pytest

from imaml import bench

ARGS = dict(workloads=["omniglot-5w1s"], methods=["imaml-gd"], batch=2, reps=1,
            modes=["vmap", "task"], mem_reps=2)


@pytest.mark.slow
def test_bench_sweep_measures_keeps_and_skips(tmp_path, monkeypatch):
    out = str(tmp_path)
    res = bench.run(out, steps=[1, 2], progress=lambda m: None, **ARGS)
    rows = res["rows"]
    assert [(r["mode"], r["steps"]) for r in rows] == [("task", 1), ("task", 2), ("vmap", 1), ("vmap", 2)]
    for r in rows:
        assert r["seconds"] > 0 and len(r["times"]) == 1
    assert len(rows[0]["peak_mibs"]) == 2 and len(rows[2]["peak_mibs"]) == 1
    assert rows[2]["batch"] == 2 and rows[0]["batch"] == 1
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
    md = (tmp_path / "bench.md").read_text()
    assert "| omniglot-5w1s | vmap x2 | imaml-gd | 2 |" in md
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    assert f"| omniglot-5w1s | task | imaml-gd | 1 | {rows[0]['peak_mib']:.1f} | 2 |" in md
    assert f"{ratio:.2f}x |" in md
    # the grid: one line per (workload, mode, method), one column per K
    assert "| workload | mode | method | K=1 | K=2 |" in md
    assert (f"| omniglot-5w1s | task | imaml-gd | {rows[0]['seconds']:#.3g} s, {rows[0]['peak_mib']:.0f} MiB | "
            f"{rows[1]['seconds']:#.3g} s, {rows[1]['peak_mib']:.0f} MiB |") in md

    # run again: every figure is kept, nothing is measured
    def no_measuring(*a, **k):
        raise AssertionError("a kept figure was measured again")
    monkeypatch.setattr(bench, "measure_in_subprocess", no_measuring)
    said = []
    again = bench.run(out, steps=[1, 2], progress=said.append, **ARGS)
    assert again["rows"] == rows and "4 figures from an earlier run are kept" in said[0]
    monkeypatch.undo()

    # a new K: its task is measured; its meta-batch is predicted not to fit and is skipped
    res = bench.run(out, steps=[1, 2, 3], mem_limit_mib=rows[0]["peak_mib"] * 1.5,
                    progress=lambda m: None, **ARGS)
    new = {(r["mode"], r["steps"]): r for r in res["rows"]}
    assert "seconds" in new[("task", 3)] and "needs about" in new[("vmap", 3)]["skipped"]
    assert new[("vmap", 2)] == rows[3]
    md = (tmp_path / "bench.md").read_text()
    assert "skipped: needs about" in md and "| K=1 | K=2 | K=3 |" in md
    assert md.count("| skipped |") == 1  # the vmap line, at K=3
    # a narrower sweep into the same folder shows its own rows and keeps every other figure
    few = bench.run(out, steps=[1], progress=lambda m: None, **ARGS)
    assert [r["steps"] for r in few["rows"]] == [1, 1]
    kept = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(kept) == 6 and kept[:2] == few["rows"]


def test_bench_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        bench.run(str(tmp_path), ["omniglot-7w1s"], ["imaml-gd"], [1], None, 1, ["task"])
    with pytest.raises(ValueError, match="unknown method"):
        bench.run(str(tmp_path), ["omniglot-5w1s"], ["mamI"], [1], None, 1, ["task"])
    (tmp_path / "bench.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a bench.json"):
        bench.run(str(tmp_path), ["omniglot-5w1s"], ["imaml-gd"], [1], None, 1, ["task"])


def test_bench_predicts_batch_memory_from_smaller_k():
    """MAML under vmap holds several times (batch x one task's peak); the prediction scales the
    meta-batch's own peak at a smaller K by one task's growth."""
    def row(mode, k, peak, batch):
        return dict(workload="omniglot-20w5s", method="maml", steps=k, mode=mode, batch=batch,
                    reps=3 if mode == "task" else 1, threads=None, seconds=1.0, peak_mib=peak)
    rows = [row("task", 10, 300.0, 1), row("task", 25, 700.0, 1), row("task", 50, 1400.0, 1),
            row("vmap", 10, 5000.0, 4), row("vmap", 25, 12000.0, 4)]
    done = {bench._key(r): r for r in rows}
    spec = dict(rows[-1], steps=50)
    del spec["seconds"], spec["peak_mib"]
    assert bench._predicted_mib(spec, done, 3) == pytest.approx(12000.0 * 1400.0 / 700.0)
    assert bench._predicted_mib(dict(spec, steps=10, mode="loop", batch=4), done, 3) == 300.0
    assert bench._predicted_mib(dict(spec, steps=5), done, 3) == 0.0  # nothing known
    assert bench._predicted_mib(dict(spec, mode="task", batch=1), done, 3) == 0.0


def test_bench_records_a_failed_worker_and_goes_on(tmp_path, monkeypatch):
    with pytest.raises(bench.WorkerError, match="exit code 1: .*unknown-workload"):
        bench._worker(dict(workload="unknown-workload", method="maml", steps=1, mode="task",
                           batch=1, reps=1, threads=1), "time")

    def killed(spec, *a, **k):
        if spec["steps"] == 2:
            raise bench.WorkerError(spec, -9, "")
        return dict(spec, seconds=0.5, times=[0.5], peak_mib=1.0, peak_mibs=[1.0])
    monkeypatch.setattr(bench, "measure_in_subprocess", killed)
    res = bench.run(str(tmp_path), ["omniglot-5w1s"], ["imaml-gd"], [1, 2, 3], None, 1, ["task"],
                    progress=lambda m: None)
    assert [r.get("skipped") for r in res["rows"]] == [None, "worker failed: killed by signal 9 (out of memory?)", None]


def test_keep_freed_memory_is_glibc_only_and_can_be_switched_off():
    """In fresh processes, so that the allocator of the test session is left as it is."""
    import ctypes.util
    import os
    import subprocess
    import sys
    code = "from imaml.profiling import keep_freed_memory; print(keep_freed_memory())"

    def run(**env):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert run(IMAML_KEEP_FREED_MEMORY="0") == "False"
    glibc = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert run(IMAML_KEEP_FREED_MEMORY="1") == str(glibc)
