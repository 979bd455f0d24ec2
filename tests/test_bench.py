"""imaml bench: each figure from fresh processes, the JSON kept after every figure and reused
when the sweep runs again, and meta-batches that cannot fit in memory skipped, not crashed."""
import json

import pytest

from imaml import bench

ARGS = dict(workloads=["omniglot-5w1s"], methods=["imaml-gd"], batch=2, reps=1,
            modes=["vmap", "task"], mem_reps=2)


def test_bench_sweep_measures_keeps_and_skips(tmp_path, monkeypatch):
    out = str(tmp_path)
    res = bench.run(out, steps=[1, 2], progress=lambda m: None, **ARGS)
    rows = res["rows"]
    assert [(r["mode"], r["steps"]) for r in rows] == [("task", 1), ("task", 2), ("vmap", 1), ("vmap", 2)]
    for r in rows:
        assert r["seconds"] > 0 and r["peak_mib"] >= 0 and len(r["times"]) == 1
    assert len(rows[0]["peak_mibs"]) == 2 and len(rows[2]["peak_mibs"]) == 1
    assert rows[2]["batch"] == 2 and rows[0]["batch"] == 1
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == rows
    md = (tmp_path / "bench.md").read_text()
    assert "| omniglot-5w1s | vmap x2 | imaml-gd | 2 |" in md
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    assert f"| omniglot-5w1s | task | imaml-gd | 1 | {rows[0]['peak_mib']:.1f} | 2 |" in md
    assert f"{ratio:.2f}x |" in md

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
    assert "skipped: needs about" in (tmp_path / "bench.md").read_text()


def test_bench_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        bench.run(str(tmp_path), ["omniglot-7w1s"], ["imaml-gd"], [1], None, 1, ["task"])
    with pytest.raises(ValueError, match="unknown method"):
        bench.run(str(tmp_path), ["omniglot-5w1s"], ["mamI"], [1], None, 1, ["task"])
    (tmp_path / "bench.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a bench.json"):
        bench.run(str(tmp_path), ["omniglot-5w1s"], ["imaml-gd"], [1], None, 1, ["task"])
