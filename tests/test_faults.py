"""Faults a run must survive or name: two trainings in one folder, a kill during a rewrite of
the run's history, a full disk, a diverging outer step, an internal error."""
import errno
import os

import pytest
import torch

from imaml.records import MetricsLog, RunLock, read_metrics, write_atomic, write_text_atomic


def test_a_run_folder_takes_one_training_at_a_time(tmp_path):
    first = RunLock(tmp_path)
    with pytest.raises(ValueError, match=f"in use by another training \\(process {os.getpid()}\\)"):
        RunLock(tmp_path)
    first.release()
    RunLock(tmp_path).release()  # free again once the first has ended


def test_failed_atomic_write_leaves_the_old_file_and_no_litter(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


def test_full_disk_is_named_as_such(tmp_path):
    def full(fh):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the disk to write") as e:
        write_atomic(tmp_path / "last.pt", full)
    assert e.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def _metrics(tmp_path, iterations, cut_last=False):
    log = MetricsLog(tmp_path, None)
    for i in iterations:
        log.log(iteration=i, split="train", loss="0.5", accuracy="0.5", seconds="0.1")
    if cut_last:  # a kill in the middle of appending a row
        with open(tmp_path / "metrics.csv", "a") as fh:
            fh.write("11,train,0.5")


def test_resume_cuts_the_history_back_whole_and_atomically(tmp_path, monkeypatch):
    _metrics(tmp_path, range(1, 11), cut_last=True)
    log = MetricsLog(tmp_path, keep_until=6)
    assert [int(r["iteration"]) for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert log.missing == 0
    # a kill during the rewrite leaves the previous history, whole
    before = (tmp_path / "metrics.csv").read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "killed")))
    with pytest.raises(OSError):
        MetricsLog(tmp_path, keep_until=3)
    assert (tmp_path / "metrics.csv").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]


def test_resume_reports_a_history_with_gaps(tmp_path):
    _metrics(tmp_path, [1, 2, 4, 5])
    assert MetricsLog(tmp_path, keep_until=5).missing == 1


def test_a_diverged_outer_step_stops_before_any_checkpoint_is_overwritten(tmp_path, monkeypatch):
    from test_train import SYNTH, synthetic_samplers
    from imaml import conv4
    from imaml import train as train_module
    from imaml.checkpoint import load_checkpoint
    from imaml.functional import NonFiniteError
    from imaml.train import load_config, train
    run = str(tmp_path / "run")
    cfg = load_config(None, SYNTH + ["meta_iters=3", "checkpoint_every=1"])
    net = lambda: conv4(1, 3, hidden=8, image_size=8)  # noqa: E731
    train(cfg, run, progress=False, network=net(), samplers=synthetic_samplers())
    good = load_checkpoint(tmp_path / "run" / "last.pt")
    real = train_module.apply_meta_gradient

    def diverge(model, opt, g):  # the outer step of iteration 4 blows up
        real(model, opt, g)
        with torch.no_grad():
            next(model.module.parameters()).fill_(float("nan"))

    monkeypatch.setattr(train_module, "apply_meta_gradient", diverge)
    cfg = load_config(None, SYNTH + ["meta_iters=5", "checkpoint_every=1"])
    with pytest.raises(NonFiniteError, match="non-finite.*lower outer_lr.*last.pt still holds "
                                             "iteration 3, which --resume continues"):
        train(cfg, run, resume=True, progress=False, network=net(), samplers=synthetic_samplers())
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["iteration"] == 3
    assert all(torch.equal(kept["state_dict"][k], good["state_dict"][k]) for k in good["state_dict"])
    assert max(int(r["iteration"]) for r in read_metrics(run)) == 3


def test_an_exploding_but_finite_run_stops_and_resumes_with_a_lower_rate(tmp_path):
    """SGD with outer_lr 1e4: finite but exploding weights (the issue's outer_lr=30..1e8
    cases) stop the run before a checkpoint of them is written; resuming with a lower rate is
    refused as a config change unless asked for with allow_change, and then continues."""
    from test_train import SYNTH, synthetic_samplers
    from imaml import conv4
    from imaml.checkpoint import load_checkpoint
    from imaml.functional import NonFiniteError
    from imaml.train import load_config, train
    run = str(tmp_path / "run")
    net = lambda: conv4(1, 3, hidden=8, image_size=8)  # noqa: E731
    base = SYNTH + ["outer=sgd", "checkpoint_every=1", "meta_iters=6"]
    train(load_config(None, base + ["meta_iters=2", "outer_lr=0.01"]), run, progress=False,
          network=net(), samplers=synthetic_samplers())
    good = load_checkpoint(tmp_path / "run" / "last.pt")
    with pytest.raises(NonFiniteError, match=r"diverged.*iteration 3.*(norm|loss).*times its "
                                             r"(start|first).*--allow-change outer_lr"):
        train(load_config(None, base + ["outer_lr=1e4"]), run, resume=True, progress=False,
              network=net(), samplers=synthetic_samplers(), allow_change=["outer_lr"])
    kept = load_checkpoint(tmp_path / "run" / "last.pt")
    assert kept["iteration"] == 2
    assert all(torch.equal(kept["state_dict"][k], good["state_dict"][k]) for k in good["state_dict"])
    assert max(float(r["loss"]) for r in read_metrics(run) if r["split"] == "train") < 100
    fixed = load_config(None, base + ["outer_lr=0.005"])
    with pytest.raises(ValueError, match="different config.*outer_lr.*--allow-change"):
        train(fixed, run, resume=True, progress=False, network=net(), samplers=synthetic_samplers())
    with pytest.raises(ValueError, match="--allow-change accepts"):
        train(fixed, run, resume=True, progress=False, network=net(),
              samplers=synthetic_samplers(), allow_change=["lam"])
    summary = train(fixed, run, resume=True, progress=False, network=net(),
                    samplers=synthetic_samplers(), allow_change=["outer_lr"])
    assert summary["iterations"] == 6
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["outer_lr"] == 0.005


def test_a_meta_test_split_that_cannot_make_tasks_fails_before_training(tmp_path, monkeypatch,
                                                                        capsys):
    from imaml import cli
    from imaml import train as train_module

    def sampler(cfg, split, queries, seed, progress=None):
        if split == "meta_test":  # what TaskSampler says of a split with too few classes
            raise ValueError("20-way tasks need 20 classes but this split has only 12")
        raise AssertionError("only the meta-test split is checked here")

    def never(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_module, "task_sampler", sampler)
    monkeypatch.setattr(train_module, "train", never)
    assert cli.main(["train", "ways=20", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "meta-test split cannot make" in err and "only 12" in err and "Traceback" not in err
    monkeypatch.setattr(train_module, "train", lambda *a, **k: {"rank": 1})
    assert cli.main(["train", "ways=20", "--no-test", "--out", str(tmp_path / "r")]) == 0


def test_an_internal_error_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from imaml import cli

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_synthetic", bug)
    assert cli.main(["synthetic", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "please report it as a bug" in err


def test_a_cli_input_error_prints_no_traceback(tmp_path, capsys):
    from imaml import cli
    text = write_text_atomic("{}", tmp_path / "c.json")
    assert cli.main(["train", str(text), "outer_lr=inf", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "outer_lr must be > 0 and finite" in err and "Traceback" not in err


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    from imaml import cli
    afile = write_text_atomic("x", tmp_path / "afile")
    assert cli.main(["train", "meta_iters=1", "--no-test", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"the run folder {afile} is a file" in err and "Traceback" not in err


DRIVER = '''
import sys, torch
sys.path.insert(0, {tests!r})
from test_train import SYNTH, synthetic_samplers
from imaml import conv4
from imaml.train import load_config, train
torch.manual_seed(0)
cfg = load_config(None, SYNTH + ["meta_iters=400", "checkpoint_every=7", "val_every=50",
                                 "val_tasks=4", "inner_adaptive=false", "inner_tol=0",
                                 "inner_steps=2", "meta_batch=2"])
train(cfg, sys.argv[1], resume=sys.argv[2] == "resume", progress=False,
      network=conv4(1, 3, hidden=8, image_size=8), samplers=synthetic_samplers())
'''


def test_repeated_sigkills_leave_a_whole_history_identical_to_an_uninterrupted_run(tmp_path):
    """SIGKILL at random moments (in steps, checkpoint writes, metrics appends), resume, again
    and again over a 400-iteration run: the history ends complete and equal, row for row, to
    the run that was never killed."""
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))

    def rows(run):
        return [(r["iteration"], r["split"], r["loss"], r["accuracy"], r["grad_norm"])
                for r in read_metrics(run)]

    ref, run = tmp_path / "ref", tmp_path / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(driver), str(ref), "new"], check=True)
    whole = time.perf_counter() - start  # one uninterrupted run, start-up included
    # Kill at random moments of a run's life, six times, then let it finish. The moments are
    # fractions of the uninterrupted run's duration, so the test does not depend on how fast
    # the machine is (a fixed 2-6 s window once never let a slow CI machine finish).
    rng, resumed_kills = random.Random(0), 0
    mode = "new"
    for attempt in range(7):
        proc = subprocess.Popen([sys.executable, str(driver), str(run), mode],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 6:
            assert proc.wait(timeout=max(600.0, 20 * whole)) == 0
            break
        try:
            proc.wait(timeout=rng.uniform(0.15, 0.45) * whole)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            resumed_kills += mode == "resume"
        else:
            assert proc.returncode == 0
            break
        mode = "resume" if (run / "last.pt").exists() else "new"
        if mode == "new":  # killed before its first checkpoint: start afresh
            import shutil
            shutil.rmtree(run, ignore_errors=True)
    assert resumed_kills >= 2, "too few kills of resumed runs to test anything: lengthen the run"
    assert rows(run) == rows(ref) and len([r for r in rows(ref) if r[1] == "train"]) == 400
