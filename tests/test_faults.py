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
    from imaml import outer as outer_module
    from imaml.checkpoint import load_checkpoint
    from imaml.functional import NonFiniteError
    from imaml.train import load_config, train
    run = str(tmp_path / "run")
    cfg = load_config(None, SYNTH + ["meta_iters=3", "checkpoint_every=1"])
    net = lambda: conv4(1, 3, hidden=8, image_size=8)  # noqa: E731
    train(cfg, run, progress=False, network=net(), samplers=synthetic_samplers())
    good = load_checkpoint(tmp_path / "run" / "last.pt")
    real = outer_module.apply_meta_gradient

    def diverge(model, opt, g):  # the outer step of iteration 4 blows up
        real(model, opt, g)
        with torch.no_grad():
            next(model.module.parameters()).fill_(float("nan"))

    monkeypatch.setattr(outer_module, "apply_meta_gradient", diverge)
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
cfg = load_config(None, SYNTH + ["meta_iters=200", "checkpoint_every=7", "val_every=50",
                                 "val_tasks=4", "inner_adaptive=false", "inner_tol=0",
                                 "inner_steps=2", "meta_batch=2"])
train(cfg, sys.argv[1], resume=sys.argv[2] == "resume", progress=False,
      network=conv4(1, 3, hidden=8, image_size=8), samplers=synthetic_samplers())
'''


@pytest.mark.slow
def test_repeated_sigkills_leave_a_whole_history_identical_to_an_uninterrupted_run(tmp_path):
    """SIGKILL at random moments (in steps, checkpoint writes, metrics appends), resume, again
    and again over a 200-iteration run: the history ends complete and equal, row for row, to
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
    per_iteration = (time.perf_counter() - start) / 200  # start-up included: an overestimate

    def trained(run):  # iterations whose train row is on disk (a half-written line is not)
        path = run / "metrics.csv"
        if not path.exists():
            return 0
        return sum(",train," in line and line.endswith("\n")
                   for line in path.read_text().splitlines(keepends=True))

    # Kill six times, each at a random iteration 10-30 past where the run stood, plus a random
    # fraction of an iteration (in a step, a checkpoint write or a metrics append), then let it
    # finish. Kills are placed by the run's own progress, not by wall-clock fractions: a slow or
    # busy CI machine once let a resumed run finish before its timed kill came.
    rng, resumed_kills = random.Random(0), 0
    mode = "new"
    for attempt in range(7):
        proc = subprocess.Popen([sys.executable, str(driver), str(run), mode],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 6:
            assert proc.wait(timeout=600) == 0
            break
        target = trained(run) + rng.randint(10, 30)
        deadline = time.perf_counter() + 600
        while proc.poll() is None and trained(run) < target and time.perf_counter() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, per_iteration))
        if proc.poll() is not None:
            assert proc.returncode == 0
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed_kills += mode == "resume"
        mode = "resume" if (run / "last.pt").exists() else "new"
        if mode == "new":  # killed before its first checkpoint: start afresh
            import shutil
            shutil.rmtree(run, ignore_errors=True)
    assert resumed_kills >= 2, "too few kills of resumed runs to test anything: lengthen the run"
    assert rows(run) == rows(ref) and len([r for r in rows(ref) if r[1] == "train"]) == 200


# -- run folders: nothing overwritten, nothing mislabelled (issue 24) ---------------------------

def _tiny_run(run, overrides, resume=False, log=None, **kw):
    from test_train import SYNTH, synthetic_samplers
    from imaml import conv4
    from imaml.train import load_config, train
    torch.manual_seed(0)
    return train(load_config(None, SYNTH + overrides), str(run), resume=resume, progress=False,
                 log=log or (lambda m: None), network=conv4(1, 3, hidden=8, image_size=8),
                 samplers=synthetic_samplers(), **kw)


def test_a_new_run_refuses_a_folder_holding_any_record(tmp_path, capsys):
    from imaml import cli
    run = tmp_path / "run"
    _tiny_run(run, ["meta_iters=2", "val_every=1", "val_tasks=2"])
    (run / "last.pt").unlink()  # the guard once looked at last.pt only
    before = {p: (run / p).read_bytes() for p in ("metrics.csv", "best.pt")}
    with pytest.raises(ValueError, match=r"already holds the records of a run \(best\.pt, "
                                         r"metrics\.csv, train_summary\.json, curves\.png\).*"
                                         r"cannot be resumed \(no last\.pt\).*another --out"):
        _tiny_run(run, ["meta_iters=2"])
    assert {p: (run / p).read_bytes() for p in before} == before
    assert cli.main(["train", "meta_iters=1", "--no-test", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds the records of a run" in err and "Traceback" not in err
    # a run that failed before its first iteration (bad data, say) left no record to protect
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "metrics.csv").write_text("iteration,split,loss\n")
    _tiny_run(failed, ["meta_iters=1"])
    assert len(read_metrics(failed)) >= 1


def test_resume_without_best_pt_says_so_and_rederives_the_best(tmp_path):
    run = tmp_path / "run"
    over = ["val_every=2", "val_tasks=4", "checkpoint_every=2"]
    _tiny_run(run, over + ["meta_iters=4"])
    (run / "best.pt").unlink()
    messages = []
    summary = _tiny_run(run, over + ["meta_iters=6"], resume=True, log=messages.append)
    assert any("best.pt is missing" in m and "cannot be restored" in m for m in messages)
    from imaml.checkpoint import load_checkpoint
    val = {int(r["iteration"]): float(r["accuracy"]) for r in read_metrics(run) if r["split"] == "val"}
    best = load_checkpoint(run / "best.pt")
    # 'best' is the best of the validations after the resume (iteration 6), not the lost one
    assert best["iteration"] == 6 and summary["best_val"] == val[6] == best["best_val"]


def test_resume_below_the_checkpoint_iteration_refuses(tmp_path):
    run = tmp_path / "run"
    _tiny_run(run, ["meta_iters=4", "checkpoint_every=2"])
    with pytest.raises(ValueError, match="at iteration 4, past meta_iters=3: nothing would be "
                                         "trained.*meta_iters above 4"):
        _tiny_run(run, ["meta_iters=3", "checkpoint_every=2"], resume=True)
    messages = []
    _tiny_run(run, ["meta_iters=4", "checkpoint_every=2"], resume=True, log=messages.append)  # finishing it again
    assert any("nothing is left to train" in m for m in messages)


def test_resume_refuses_an_edited_config_json_and_uses_the_runs_own(tmp_path, monkeypatch,
                                                                    capsys):
    import json
    from imaml import cli
    from imaml import train as train_module
    run = tmp_path / "run"
    _tiny_run(run, ["meta_iters=2"])
    held = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**held, "meta_iters": 9}))
    with pytest.raises(ValueError, match=r"config\.json was edited after the run wrote it "
                                         r"\(meta_iters: 9 in the file, 4 in this resume\).*"
                                         r"write over it"):
        _tiny_run(run, ["meta_iters=4"], resume=True)
    assert json.loads((run / "config.json").read_text())["meta_iters"] == 9  # not rewritten
    # a resume with another config is told where the run's own one is
    with pytest.raises(ValueError, match=r"different config.*lam.*The run's own config is "
                                         r".*config\.json: resume with it"):
        _tiny_run(run, ["meta_iters=9", "lam=3"], resume=True)
    # from the command line, --resume without a config resumes with the run's own
    seen = {}
    monkeypatch.setattr(train_module, "train",
                        lambda cfg, out, **k: seen.update(cfg=cfg) or {"rank": 1})
    assert cli.main(["train", "--resume", "--no-test", "--out", str(run)]) == 0
    assert seen["cfg"].meta_iters == 9 and seen["cfg"].ways == 3
    assert "resuming with the run's own config" in capsys.readouterr().out


# -- divergence the guard must see (issue 24) ---------------------------------------------------

def test_a_first_iteration_blow_up_stops_the_run(tmp_path):
    """MAML with a huge fixed inner step: a finite loss of millions at iteration 1 (the
    yardsticks were once taken from it, and the run exited 0)."""
    from imaml.functional import NonFiniteError
    with pytest.raises(NonFiniteError, match=r"diverged: the training loss of iteration 1 is "
                                             r".*times the loss of chance.*lower inner_lr"):
        _tiny_run(tmp_path / "run", ["method=maml", "inner_lr=1e4", "inner_steps=1",
                                     "inner_adaptive=false", "inner_tol=0", "meta_iters=3"])
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "best.pt").exists()


def test_an_all_zero_meta_gradient_run_is_refused(tmp_path):
    """Reptile with inner_lr 1e4 and adaptive steps: every trial step is rejected, φ = θ, the
    meta-gradient is exactly 0 and θ never moves."""
    with pytest.raises(ValueError, match=r"meta-gradient is exactly 0 in iteration 1.*every "
                                         r"trial step was rejected.*lower inner_lr"):
        _tiny_run(tmp_path / "run", ["method=reptile", "inner_lr=1e4", "outer=sgd",
                                     "outer_lr=0.5", "meta_iters=3"])


def test_zero_meta_gradients_later_in_a_run_stop_it_after_a_streak(tmp_path, monkeypatch):
    from imaml import train as train_module
    real = train_module.mean_meta_gradient

    def zero_after_two(method, model, theta, sampler, indices, *a, **k):
        means, stats = real(method, model, theta, sampler, indices, *a, **k)
        if indices[0] >= 2 * 4:
            means["grad"] = means["grad"] * 0
        return means, stats

    monkeypatch.setattr(train_module, "mean_meta_gradient", zero_after_two)
    with pytest.raises(ValueError, match=f"exactly 0 in iterations 3-{2 + train_module.ZERO_STREAK}"):
        _tiny_run(tmp_path / "run", ["meta_iters=30", "val_every=100", "checkpoint_every=100"])


def test_a_suspect_run_never_writes_over_its_last_good_checkpoint(tmp_path, monkeypatch):
    """The weights grow 20x at iteration 3 (suspect, not yet diverged; the loss follows),
    then the run diverges: the checkpoints taken while it was suspect are not written,
    last.pt stays at iteration 2, and the message advises resuming from that one."""
    from imaml import outer as outer_module
    from imaml.checkpoint import load_checkpoint
    from imaml.functional import NonFiniteError
    real = outer_module.apply_meta_gradient
    calls = []

    def grow(model, opt, g):
        real(model, opt, g)
        calls.append(1)
        factor = {3: 20.0, 5: 10.0}.get(len(calls))
        if factor:
            with torch.no_grad():
                for p in model.module.parameters():
                    p.mul_(factor)

    monkeypatch.setattr(outer_module, "apply_meta_gradient", grow)
    messages = []
    with pytest.raises(NonFiniteError, match="diverged: the outer step of iteration [45] .*"
                                             "last.pt still holds iteration 2, which --resume"):
        _tiny_run(tmp_path / "run", ["meta_iters=8", "checkpoint_every=1", "val_every=100"],
                  log=messages.append)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2


def test_a_norm_that_grows_steadily_past_the_suspect_factor_keeps_its_checkpoints(tmp_path,
                                                                                 monkeypatch):
    """A long run may grow θ's norm many times over (a 2-hour run grew it 4x): growth of 1.6x
    per iteration, 17x in all, is never suspect, since the yardstick is the norm at the last
    checkpoint written; last.pt follows every iteration. The convolutions are scaled (batch
    norm follows each: the loss does not change), so only the norm moves."""
    from imaml import train as train_module
    from imaml import outer as outer_module
    from imaml.checkpoint import load_checkpoint
    real = outer_module.apply_meta_gradient

    def grow(model, opt, g):
        real(model, opt, g)
        with torch.no_grad():
            for p in model.module.parameters():
                if p.dim() == 4:
                    p.mul_(1.6)

    monkeypatch.setattr(outer_module, "apply_meta_gradient", grow)
    messages = []
    _tiny_run(tmp_path / "run", ["meta_iters=8", "checkpoint_every=1", "val_every=100"],
              log=messages.append)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["iteration"] == 8
    assert ck["reference"]["checkpoint_norm"] > train_module.SUSPECT * ck["reference"]["param_norm"]
    assert not any("sign of divergence" in m for m in messages)


# -- checkpoints and config files: named faults, not tracebacks or wrong advice (issue 24) -------

def test_a_damaged_checkpoint_is_named_for_what_it_is(tmp_path, capsys):
    from imaml import cli
    from imaml.checkpoint import FORMAT, VERSION, build_network, save_checkpoint
    net = build_network("omniglot", 5)
    with torch.no_grad():
        next(net.parameters())[0].fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.pt", net, dataset="omniglot", ways=5, shots=1, queries=1,
                    method={"name": "imaml-gd"})
    good = build_network("omniglot", 5).state_dict()
    for missing in ("dataset", "ways", "method"):
        obj = {"format": FORMAT, "version": VERSION, "dataset": "omniglot", "ways": 5, "shots": 1,
               "queries": 1, "method": {"name": "imaml-gd"}, "state_dict": good}
        del obj[missing]
        torch.save(obj, tmp_path / f"no-{missing}.pt")
    cases = [(["eval", str(tmp_path / "nan.pt")], "holds non-finite weights .*0.weight.*diverged"),
             (["eval", str(tmp_path)], "is a folder; name the checkpoint file in it"),
             (["eval", str(tmp_path / "no-dataset.pt")], "lacks dataset"),
             (["eval", str(tmp_path / "no-ways.pt")], "lacks ways"),
             (["eval", str(tmp_path / "no-method.pt")], "lacks method"),
             (["solver-accuracy", "--checkpoint", f"a={tmp_path / 'no-ways.pt'}", "--out",
               str(tmp_path / "o")], "lacks ways"),
             (["solver-accuracy", "--checkpoint", "a=x.pt", "--checkpoint", "a=y.pt", "--out",
               str(tmp_path / "o")], "label 'a' is given twice"),
             (["train", str(tmp_path), "--out", str(tmp_path / "r")],
              "config file .* is a folder; name the JSON file"),
             (["train", "inner_step=3", "--out", str(tmp_path / "r")],
              "unknown config field 'inner_step' \\(did you mean 'inner_steps'\\?\\)")]
    import re
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (argv, err)
        assert "lower the learning rate" not in err and "does not exist" not in err, (argv, err)


@pytest.mark.parametrize("flag", ["--shots", "--ways", "--queries"])
def test_eval_refuses_zero_shots_ways_or_queries(flag, capsys):
    from imaml import cli
    with pytest.raises(SystemExit) as e:  # argparse: exit 2 with the flag named
        cli.main(["eval", "unused.pt", flag, "0"])
    assert e.value.code == 2
    assert f"argument {flag}: every value must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ('{"lam": 2.0, "lam": 3.0}', "'lam' given twice; keep one"),
    ('{"inner_tol": Infinity}', "Infinity is not a JSON number"),
    ('{"lam": NaN}', "NaN is not a JSON number"),
])
def test_config_files_with_a_repeated_key_or_no_number_are_refused(tmp_path, text, message):
    from imaml.train import load_config
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(ValueError, match=f"config file .*c.json: {message}"):
        load_config(str(tmp_path / "c.json"))


@pytest.mark.parametrize("override,message", [
    ("inner_tol=inf", "inner_tol must be >= 0 and finite"),
    ("inner_tol=nan", "inner_tol must be >= 0 and finite"),
    ("momentum=inf", r"momentum must be in \[0, 1\)"),
    ("prox_lam=inf", "prox_lam must be a finite number"),
    ("hf_damping=inf", "damping must be a finite number"),
    ("lam_lr=nan", "lam_lr must be > 0 and finite"),
    ("outer_lr_min=nan", r"outer_lr_min must lie in \[0, outer_lr\]")])
def test_no_config_field_takes_a_non_finite_number(override, message):
    """inner_tol=inf once made every inner solve 'converge' at step 0, and config.json then
    held the non-JSON token Infinity."""
    from imaml.train import load_config
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_a_full_disk_advises_resume_only_to_a_training(tmp_path, monkeypatch, capsys):
    from imaml import cli, records

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)
    monkeypatch.setattr(cli, "_synthetic", lambda args: records.write_text_atomic("x", tmp_path / "r.json") and 0)
    assert cli.main(["synthetic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk to write" in err and "--resume" not in err
    from imaml import train as train_module
    monkeypatch.setattr(train_module, "train", lambda *a, **k: records.write_text_atomic(
        "x", tmp_path / "last.pt"))
    assert cli.main(["train", "--no-test", "--out", str(tmp_path / "run")]) == 2
    assert "with --resume, the training continues" in capsys.readouterr().err


def test_a_config_json_written_by_a_resume_that_stopped_is_not_an_edit(tmp_path):
    """A resume with --allow-change writes config.json with the new rate, then stops (diverged,
    killed) before its first checkpoint: the file differs from last.pt's config, but the run
    wrote it, so the next resume is not refused as an edit."""
    import json
    run = tmp_path / "run"
    _tiny_run(run, ["meta_iters=2"])
    held = json.loads((run / "config.json").read_text())
    from imaml.train import CONFIG_DIGEST, _config_digest
    fields = {k: v for k, v in held.items() if k != CONFIG_DIGEST}
    fields["outer_lr"] = 0.5  # what the stopped resume wrote
    (run / "config.json").write_text(json.dumps({**fields, CONFIG_DIGEST: _config_digest(fields)}))
    summary = _tiny_run(run, ["meta_iters=3", "outer_lr=0.005"], resume=True,
                        allow_change=["outer_lr"])
    assert summary["iterations"] == 3
