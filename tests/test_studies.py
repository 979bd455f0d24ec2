"""The study commands: solver accuracy against a reference solve, and time to accuracy."""
import json

import pytest
import torch

from imaml import IMAML, FunctionalModel, GradientDescent, Task, conv4


def test_solver_accuracy_rows_and_table():
    from imaml.solver_study import _task_rows, table
    torch.manual_seed(0)
    fm = FunctionalModel(conv4(1, 3, hidden=4, image_size=8).double())
    g = torch.Generator().manual_seed(0)
    task = Task(torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3),
                torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(2))
    method = IMAML(lam=2.0, inner=GradientDescent(lr=0.05, steps=8, adaptive=True, tol=0.05))
    rows = _task_rows(fm, method, fm.theta(), task, 2.0, (5, 40), ref_tol=1e-6)
    assert len(rows) == 2 * 5 * 2
    err = {(r["phi"], r["solver"], r["iterations"]): r["rel_error"] for r in rows}
    # MINRES on the exact system at the reference φ converges to the reference itself: from
    # 0.33 at 5 iterations to about 1e-6 at 40 (9.7e-7 here, 1.05e-6 on another machine of
    # this kind: the last digits of an indefinite solve depend on the machine's rounding), so
    # the test asks for five orders of magnitude less error than at 5 iterations, and for
    # 1e-5, ten times the largest error measured
    assert err[("reference", "MINRES", 40)] < 1e-5
    assert err[("reference", "MINRES", 40)] < 1e-5 * err[("reference", "MINRES", 5)]
    # the official damped operator solves another system: its error does not vanish
    assert err[("reference", "official 2I + H/(λ+10)", 40)] > 0.1
    for r in rows:
        r.update(checkpoint="tiny", iteration=0, task=0)
    text = table(rows)
    assert "| MINRES |" in text and "tiny, 40 it." in text and "reference ‖∇G‖" in text


def test_time_to_accuracy_reads_run_records(tmp_path):
    import gzip
    from imaml.time_to_accuracy import first_reach, run
    for name, accs, packed in (("a", [0.9, 0.96, 0.975, 0.985], False), ("b", [0.8, 0.9, 0.95, 0.96], True)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"dataset": "omniglot", "ways": 5, "shots": 1,
                                                   "method": f"m{name}"}))
        lines = ["iteration,split,loss,accuracy,ci95,grad_norm,seconds"]
        for i, acc in enumerate(accs):
            lines += [f"{i * 2 + 1},train,1,0.5,,1,30", f"{i * 2 + 2},train,1,0.5,,1,30",
                      f"{i * 2 + 2},val,,{acc},0.01,,"]
        text = "\n".join(lines) + "\n"
        if packed:
            (d / "metrics.csv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (d / "metrics.csv").write_text(text)
    table = run([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    # each validation sits at the training minutes before it: 2 iterations of 30 s each
    assert "| a | ma | 2.0 | 3.0 | 4.0 | 98.50% | 4.0 |" in table
    assert "| b | mb | 3.0 | not reached | not reached | 96.00% | 4.0 |" in table
    assert (tmp_path / "out" / "time_to_accuracy.png").exists()
    assert first_reach([(1.0, 1, 0.5)], 0.9) is None
    with pytest.raises(ValueError, match="no config.json"):
        run([str(tmp_path)], str(tmp_path / "out"))


def test_time_to_accuracy_plot_never_hides_a_run():
    from imaml.time_to_accuracy import y_limits
    high = {"points": [(1.0, 10, 0.40), (10.0, 100, 0.80), (50.0, 500, 0.87)]}
    low = {"points": [(20.0, 100, 0.54), (90.0, 242, 0.645)]}
    # the floor (thresholds 80-90 %: 65) clips the high run's early 40 % ...
    assert y_limits([high], 65.0) == (65.0, 92.0)
    # ... but drops so that the low run's best point (64.5 %) is 5 points above the bottom
    lo, hi = y_limits([high, low], 65.0)
    assert lo == pytest.approx(59.5) and hi == pytest.approx(92.0)


def test_time_to_accuracy_thresholds_from_the_command_line(tmp_path, capsys):
    from imaml.cli import main
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"dataset": "omniglot", "ways": 20, "shots": 1,
                                               "method": "maml"}))
    (d / "metrics.csv").write_text("iteration,split,loss,accuracy,ci95,grad_norm,seconds\n"
                                   "1,train,1,0.5,,1,60\n1,val,,0.82,0.01,,\n"
                                   "2,train,1,0.5,,1,60\n2,val,,0.88,0.01,,\n")
    assert main(["time-to-accuracy", str(d), "--out", str(tmp_path / "o"),
                 "--thresholds", "80", "85", "90"]) == 0
    out = capsys.readouterr().out
    assert "minutes to 80% | minutes to 85% | minutes to 90%" in out
    assert "| r | maml | 1.0 | 2.0 | not reached | 88.00% | 2.0 |" in out
    saved = json.loads((tmp_path / "o" / "time_to_accuracy.json").read_text())
    assert saved["thresholds"] == [0.8, 0.85, 0.9]


def _run_folder(path, config=None, metrics=None, packed=None):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config)
    if metrics is not None:
        (path / "metrics.csv").write_text(metrics)
    if packed is not None:
        (path / "metrics.csv.gz").write_bytes(packed)
    return str(path)


@pytest.mark.parametrize("config,metrics,packed,message", [
    ('{"dataset": "omniglot", "ways": 5, "shots": 1, "method": "maml"}',
     "iteration,split,loss,accuracy,ci95,grad_norm,seconds\n1,train,1,0.5,,1,30\n", None,
     "hold no validation rows"),
    ('{"dataset": "omniglot", "ways": 5, "shots": 1, "method": "maml"}', None, b"\x1f\x8b garbage",
     r"metrics.csv.gz cannot be read .*truncated or corrupt"),
    ("{}", "iteration,split,accuracy,seconds\n", None,
     "not the config of an imaml run: it lacks dataset, ways, shots, method"),
    ("{not json", "iteration,split,accuracy,seconds\n", None, "config.json is not valid JSON"),
    ('{"dataset": "omniglot", "ways": 5, "shots": 1, "method": "maml"}', "a,b\n1,2\n", None,
     "not the metrics of an imaml run: it lacks the column\\(s\\) iteration, split"),
])
def test_time_to_accuracy_refuses_records_it_cannot_time(tmp_path, config, metrics, packed,
                                                          message, capsys):
    from imaml import cli
    run = _run_folder(tmp_path / "run", config, metrics, packed)
    assert cli.main(["time-to-accuracy", run, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "time_to_accuracy.md").exists()
