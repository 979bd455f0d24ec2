"""Data-parallel meta-training with torch.distributed (gloo, 2 CPU processes)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imaml import IMAML, MAML, FunctionalModel, GradientDescent, conv4
from imaml.data import ImageClasses, TaskSampler
from imaml.distributed import mean_meta_gradient
from imaml.train import read_metrics
from conftest import needs_omniglot


def setup():
    torch.manual_seed(0)
    fm = FunctionalModel(conv4(1, 3, hidden=8, image_size=8).double())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10 * 6, 1, 8, 8), generator=g, dtype=torch.uint8)
    classes = ImageClasses(images, torch.arange(11) * 6, [f"c{i}" for i in range(10)])
    return fm, TaskSampler(classes, ways=3, shots=1, queries=2, seed=5)


def to_double(sampler):
    batch = sampler.batch
    def double_batch(indices):
        b = batch(indices)
        b.x_support, b.x_query = b.x_support.double(), b.x_query.double()
        return b
    sampler.batch = double_batch
    return sampler


METHODS = {"imaml": IMAML(inner=GradientDescent(lr=0.1, steps=3)),
           "maml": MAML(inner=GradientDescent(lr=0.1, steps=2))}


def _worker(rank, world, init_file, name, batched, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    fm, sampler = setup()
    means, stats = mean_meta_gradient(METHODS[name], fm, fm.theta(), to_double(sampler), range(7),
                                      batched, rank, world)
    if rank == 0:
        torch.save((means["grad"], stats), out)
    # Both ranks leave together, and without gloo's teardown: a peer torn down while the other
    # is still connected aborted a worker ("terminate called without an active exception")
    # once in a few dozen runs even after the barrier. The result is written and closed above,
    # so the worker exits at once, skipping the destructors.
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("name,batched", [("imaml", True), ("imaml", False), ("maml", True)])
def test_distributed_meta_gradient_equals_single_process(tmp_path, name, batched):
    out = tmp_path / "g.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), name, batched, str(out)), nprocs=2, join=True)
    g2, stats2 = torch.load(out)
    fm, sampler = setup()
    means, stats1 = mean_meta_gradient(METHODS[name], fm, fm.theta(), to_double(sampler),
                                       range(7), batched)
    g1 = means["grad"]
    assert float((g2 - g1).norm() / g1.norm()) < 1e-6
    for k in ("loss", "accuracy", "inner_converged", "cg_residual", "negative_curvature"):
        assert stats2[k] == pytest.approx(stats1[k], rel=1e-6, nan_ok=True), k
    # and the single-process mean is the plain mean of the per-task meta-gradients
    tasks = to_double(sampler).batch(range(7)).tasks()
    ref = torch.stack([METHODS[name].meta_gradient(fm, fm.theta(), t).grad for t in tasks]).mean(0)
    assert float((g1 - ref).norm() / ref.norm()) < 1e-9


TINY = ["ways=3", "shots=1", "queries=1", "eval_queries=2", "meta_batch=4", "inner_steps=2",
        "checkpoint_every=1", "val_every=3", "val_tasks=4", "threads=1",
        "batching=vmap"]


def torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "imaml.cli", "train", *TINY, *extra, "--out", str(out), "--no-test"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@needs_omniglot
def test_two_process_training_resumes_to_the_same_metrics(tmp_path):
    torchrun(tmp_path / "straight", "meta_iters=6")
    torchrun(tmp_path / "interrupted", "meta_iters=3")
    torchrun(tmp_path / "interrupted", "meta_iters=6", "--resume")
    rows = lambda d: [tuple(r[k] for k in ("iteration", "split", "loss", "accuracy", "grad_norm"))  # noqa: E731
                      for r in read_metrics(d)]
    assert rows(tmp_path / "straight") == rows(tmp_path / "interrupted")
    assert len(rows(tmp_path / "straight")) == 8  # 6 train rows + 2 validations


def test_auto_batching_times_both_paths():
    from imaml.train import _choose_batching
    fm, sampler = setup()
    mode, timings = _choose_batching(METHODS["imaml"], fm, to_double(sampler), range(4), 0, 1)
    assert set(timings) == {"vmap", "loop"} and mode == min(timings, key=timings.get)


def test_a_rank_without_tasks_contributes_zeros():
    from imaml.distributed import STATS, local_sums, shard
    fm, sampler = setup()
    assert shard(range(3), rank=5, world=8) == []
    zero = local_sums(METHODS["imaml"], fm, fm.theta(), None, batched=True)
    assert set(zero) == {"grad", "stats"}
    assert zero["grad"].shape == fm.theta().shape and not zero["grad"].any()
    assert zero["stats"].shape == (len(STATS),) and not zero["stats"].any()
    # and a rank's sums are additive: two halves of a batch sum to the whole
    b = to_double(sampler).batch(range(4))
    from imaml.tasks import TaskBatch
    fields = ("x_support", "y_support", "x_query", "y_query")
    half = lambda i: TaskBatch(*(getattr(b, f)[i] for f in fields))  # noqa: E731
    whole = local_sums(METHODS["imaml"], fm, fm.theta(), b, batched=True)
    parts = [local_sums(METHODS["imaml"], fm, fm.theta(), half(i), batched=True)
             for i in (slice(0, 2), slice(2, 4))]
    assert torch.allclose(parts[0]["grad"] + parts[1]["grad"], whole["grad"], rtol=1e-6, atol=1e-7)
    assert torch.allclose(parts[0]["stats"] + parts[1]["stats"], whole["stats"], rtol=1e-6)


# -- one process of a torchrun run ending (issue 24) ---------------------------------------------

def _peer_worker(rank, world, init_file, out):
    """Rank 1 ends abruptly; rank 0, waiting for it in an all_reduce, runs through the command
    line's error handling."""
    import datetime
    import io
    from contextlib import redirect_stderr
    from imaml import cli
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    dist.barrier()
    if rank == 1:
        os._exit(3)  # as if killed: no teardown, no message

    def collective(args):
        dist.all_reduce(torch.ones(4))
        return 0

    cli._synthetic = collective
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["synthetic", "--out", "unused"])
    with open(out, "w") as f:
        f.write(f"{code}\n{err.getvalue()}")
    os._exit(0)


def test_a_rank_left_alone_by_its_peer_stops_with_a_message_not_a_bug_report(tmp_path):
    """A peer that ends makes this rank's collective fail: the command line says that another
    process ended (exit 2), not "an unexpected internal error ... report it as a bug"."""
    out = tmp_path / "rank0.txt"
    ctx = mp.start_processes(_peer_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(timeout=120)
    code, err = out.read_text().split("\n", 1)
    assert code == "2", err
    assert "another process of this torchrun run ended" in err
    assert "report it as a bug" not in err and "Traceback" not in err


SLEEPER = '''
import sys, time
from imaml.distributed import init_from_env
init_from_env()
open(sys.argv[1] + "." + __import__("os").environ["RANK"], "w").close()
time.sleep(300)
'''


def _descendants(pid):
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_do_not_outlive_a_killed_torchrun_agent(tmp_path):
    """SIGKILL to the torchrun agent (it cannot stop its workers then): the workers end within
    seconds instead of training on as orphans."""
    import signal
    import time
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    ready = tmp_path / "ready"
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", str(script), str(ready)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
            assert time.time() < deadline and agent.poll() is None, "the workers never started"
            time.sleep(0.2)
        workers = [p for p in _descendants(agent.pid) if _alive(p)]
        assert len(workers) >= 2
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 30
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their torchrun agent"
    finally:
        for p in workers + _descendants(agent.pid) + [agent.pid]:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
