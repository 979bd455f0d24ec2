"""Meta-training: configs, checkpoints, kill-and-resume, and the checkpoint API example of
docs/getting-started.md."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml.checkpoint import CheckpointError, MetaModel, build_network, load_checkpoint, save_checkpoint
from imaml import FunctionalModel
from imaml.train import load_config, outer_lr_at, read_metrics
from conftest import needs_omniglot

ROOT = Path(__file__).resolve().parents[1]

TINY = ["ways=3", "shots=1", "queries=1", "eval_queries=2", "meta_batch=2", "inner_steps=2",
        "meta_iters=14", "checkpoint_every=1", "val_every=7", "val_tasks=4", "test_tasks=4",
        "threads=1", "batching=vmap", "lr_schedule=cosine", "outer_lr_min=0.0001"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "imaml.cli", *args], capture_output=True,
                          text=True, **kw)


# -- configs ----------------------------------------------------------------------------------

def test_every_shipped_config_is_valid():
    files = sorted((ROOT / "configs").glob("*.json"))
    assert len(files) >= 26  # 20 Omniglot cells + 5 Mini-ImageNet + quickstart
    for f in files:
        cfg = load_config(str(f))
        assert cfg.dataset in ("omniglot", "miniimagenet")
    cells = {(c.ways, c.shots, c.method) for c in map(load_config, map(str, files)) if c.dataset == "omniglot"}
    for w, k in ((5, 1), (5, 5), (20, 1), (20, 5)):
        for m in ("imaml-gd", "imaml-hf", "maml", "fomaml", "reptile"):
            assert (w, k, m) in cells


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config field 'meta_iter'"):
        load_config(None, ["meta_iter=5"])
    with pytest.raises(ValueError, match="'meta_batch' expects int, got 'many'"):
        load_config(None, ["meta_batch=many"])
    with pytest.raises(ValueError, match="must look like field=value"):
        load_config(None, ["meta_batch"])
    with pytest.raises(ValueError, match="lam must be > 0"):
        load_config(None, ["lam=0"])
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(None, ["method=sgd"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ways": "five"}))
    with pytest.raises(ValueError, match="'ways' expects int, got str"):
        load_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))
    cfg = load_config(None, ["outer_lr=0.01", "max_minutes=null", "batching=loop"])
    assert cfg.outer_lr == 0.01 and cfg.max_minutes is None and cfg.batching == "loop"
    with pytest.raises(ValueError, match="batching must be"):
        load_config(None, ["batching=yes"])
    with pytest.raises(ValueError, match="lr_schedule must be"):
        load_config(None, ["lr_schedule=step"])
    with pytest.raises(ValueError, match="outer_lr_min must lie"):
        load_config(None, ["outer_lr=0.001", "outer_lr_min=0.01"])
    out = cli("train", "ways=x")
    assert out.returncode == 2 and "expects int" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("override,message", [
    ("outer_lr=inf", "outer_lr must be > 0 and finite"),
    ("inner_lr=inf", "inner_lr must be > 0 and finite"),
    ("inner_lr=nan", "inner_lr must be > 0 and finite"),
    ("lam=inf", "lam must be > 0 and finite"),
    ("max_minutes=-1", "max_minutes must be > 0"),
    ("eval_inner_steps=0", "eval_inner_steps must be at least 1"),
    ("threads=-1", "threads must be at least 1"),
    ("cg_max_iter=0", "cg_max_iter must be >= 1"),
    ("linear_solver=lu", "linear_solver must be"),
    ("lr_schedule=cosine-time", "set max_minutes"),
])
def test_config_rejects_impossible_values(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_cosine_outer_lr_schedule():
    cfg = load_config(None, ["outer_lr=0.003", "outer_lr_min=0.0001", "lr_schedule=cosine",
                             "meta_iters=101"])
    lrs = [outer_lr_at(cfg, i) for i in range(1, 102)]
    assert lrs[0] == pytest.approx(0.003) and lrs[-1] == pytest.approx(0.0001)
    assert lrs[50] == pytest.approx((0.003 + 0.0001) / 2)  # half-way down the cosine
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    const = load_config(None, ["outer_lr=0.003", "meta_iters=101"])
    assert {outer_lr_at(const, i) for i in (1, 50, 101)} == {0.003}
    timed = load_config(None, ["outer_lr=0.003", "outer_lr_min=0.0001", "lr_schedule=cosine-time",
                               "max_minutes=10"])
    assert outer_lr_at(timed, 7, elapsed=0.0) == pytest.approx(0.003)
    assert outer_lr_at(timed, 7, elapsed=300.0) == pytest.approx((0.003 + 0.0001) / 2)
    assert outer_lr_at(timed, 7, elapsed=900.0) == pytest.approx(0.0001)  # past the budget
    with pytest.raises(ValueError, match="max_minutes"):
        load_config(None, ["lr_schedule=cosine-time"])


# -- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_errors(tmp_path):
    net = build_network("omniglot", 5)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, net, dataset="omniglot", ways=5, shots=1, queries=1,
                    method={"name": "imaml-gd"})
    mm = MetaModel.load(path)
    assert torch.equal(mm.model.theta(), torch.cat([p.detach().flatten() for p in net.parameters()]))
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(trunc)
    other = tmp_path / "other.pt"  # weights of a 20-way network labelled as 5-way
    save_checkpoint(other, build_network("omniglot", 20), dataset="omniglot", ways=5, shots=1,
                    queries=1, method={"name": "imaml-gd"})
    with pytest.raises(CheckpointError, match="do not fit the omniglot 5-way network"):
        MetaModel.load(other)
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an imaml checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    out = cli("eval", str(trunc))
    assert out.returncode == 2 and "truncated" in out.stderr and "Traceback" not in out.stderr


# -- training, kill and resume ------------------------------------------------------------------

def train_rows(out):
    return [(r["iteration"], r["split"], r["loss"], r["accuracy"], r["ci95"], r["grad_norm"])
            for r in read_metrics(out)]


@pytest.mark.slow
@needs_omniglot
def test_sigkill_and_resume_gives_the_same_metrics(tmp_path):
    ref = tmp_path / "ref"
    r = cli("train", *TINY, "--out", str(ref), "--no-test")
    assert r.returncode == 0, r.stderr
    expected = train_rows(ref)
    assert len([x for x in expected if x[1] == "train"]) == 14 and any(x[1] == "val" for x in expected)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "imaml.cli", "train", *TINY, "--out", str(run),
                             "--no-test"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the middle, once a few iterations are logged
        if (run / "metrics.csv").exists() and len(read_metrics(run)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len([x for x in train_rows(run) if x[1] == "train"]) < 14, "the run ended before the kill"
    r = cli("train", *TINY, "--out", str(run), "--resume", "--no-test")
    assert r.returncode == 0, r.stderr
    assert train_rows(run) == expected
    assert (run / "best.pt").exists() and (run / "curves.png").exists()

    # a finished run is not silently overwritten, and resume needs a checkpoint
    r = cli("train", *TINY, "--out", str(run), "--no-test")
    assert r.returncode == 2 and "--resume" in r.stderr
    r = cli("train", *TINY, "--out", str(tmp_path / "none"), "--resume", "--no-test")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    r = cli("train", *TINY, "lam=3", "--out", str(run), "--resume", "--no-test")
    assert r.returncode == 2 and "different config" in r.stderr
    # under a cosine schedule the length of the run is part of the schedule
    r = cli("train", *TINY, "meta_iters=20", "--out", str(run), "--resume", "--no-test")
    assert r.returncode == 2 and "different config" in r.stderr


@pytest.mark.slow
@needs_omniglot
def test_train_eval_and_readme_checkpoint_api(tmp_path):
    out = tmp_path / "run"
    r = cli("train", *TINY, "meta_iters=3", "--out", str(out), "--progress-every", "0")
    assert r.returncode == 0, r.stderr
    # stdout is a pipe, not a terminal: plain progress lines instead of the bar
    assert "iteration 3/3 (100%)" in r.stdout and "s/it" in r.stdout
    assert "meta-test accuracy of the best model" in r.stdout
    final = json.loads((out / "final.json").read_text())
    assert final["test_tasks"] == 4
    # ... and how far the inner solves of that test got (iMAML: the tolerance it states)
    assert ("meta-test inner problem: mean ||grad G||" in r.stdout
            and f"tolerance met on {100 * final['inner_converged']:.1f}%" in r.stdout)
    r = cli("eval", str(out / "best.pt"), "--tasks", "6", "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0 and "95% CI over 6 tasks" in r.stdout
    # the final test is the evaluation protocol on the same meta-test tasks (seed 0)
    r = cli("eval", str(out / "best.pt"), "--tasks", "4", "--out", str(tmp_path / "e4.json"))
    assert r.returncode == 0
    assert json.loads((tmp_path / "e4.json").read_text())["mean"] == final["test_accuracy"]
    r = cli("eval", str(out / "best.pt"), "--split", "meta_val", "--tasks", "3", "--inner-steps", "5",
            "--out", str(tmp_path / "v.json"))
    assert r.returncode == 0 and "meta_val" in r.stdout
    assert json.loads((tmp_path / "v.json").read_text())["method"]["inner_steps"] == 5
    r = cli("eval", str(out / "best.pt"), "--split", "meta_val", "--tasks", "3", "--lam", "0.5",
            "--inner-lr", "0.05", "--out", str(tmp_path / "l.json"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "l.json").read_text())["method"]
    assert (m["lam"], m["inner_lr"]) == (0.5, 0.05)
    for bad, msg in ((("--inner-steps", "0"), "--inner-steps must be at least 1"),
                     (("--lam", "0"), "--lam 0.0: lam must be > 0"),
                     (("--inner-lr", "-1"), "--inner-lr -1.0: lr must be > 0")):
        r = cli("eval", str(out / "best.pt"), *bad)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    # the "Use a meta-trained model" example of docs/getting-started.md, on this checkpoint
    text = (ROOT / "docs" / "getting-started.md").read_text()
    block = text.split("<!-- checkpoint-example -->")[1].split("```python\n")[1].split("```")[0]
    ns = {}
    exec(compile(block.replace("runs/quickstart/best.pt", str(out / "best.pt")),
                 "docs/getting-started.md", "exec"), ns)
    assert ns["labels"].shape == ns["y_query"].shape


# -- training on the caller's own model and tasks (no dataset on disk) --------------------------

def synthetic_samplers(ways=3):
    """Meta-train and meta-val samplers over 12 classes of 6 random 8x8 images each."""
    from imaml.data import TaskSampler
    from imaml.data.common import ImageClasses
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12 * 6, 1, 8, 8), generator=g, dtype=torch.uint8)
    classes = ImageClasses(images, torch.arange(13) * 6, [f"c{i}" for i in range(12)])
    return TaskSampler(classes, ways, 1, 2, seed=0), TaskSampler(classes, ways, 1, 2, seed=1)


SYNTH = ["ways=3", "shots=1", "queries=2", "eval_queries=2", "meta_batch=4", "val_every=10",
         "val_tasks=20", "checkpoint_every=10", "threads=1", "batching=vmap", "outer_lr=0.01",
         "inner_adaptive=true", "inner_tol=0.05", "linear_solver=minres"]


@pytest.mark.slow
def test_training_end_to_end_without_a_dataset(tmp_path):
    from imaml import conv4
    from imaml.train import train
    cfg = load_config(None, SYNTH + ["meta_iters=30"])
    torch.manual_seed(0)
    net = conv4(1, 3, hidden=8, image_size=8)
    summary = train(cfg, str(tmp_path / "run"), progress=False, network=net,
                    samplers=synthetic_samplers())
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert summary["iterations"] == 30 and len(train_rows) == 30
    assert [int(r["iteration"]) for r in val_rows] == [10, 20, 30]
    assert summary["best_val"] == max(float(r["accuracy"]) for r in val_rows)
    # the inner and linear solves are recorded for every iteration
    for r in train_rows:
        assert float(r["inner_grad_norm"]) >= 0 and 0 <= float(r["inner_converged"]) <= 1
        assert 0 <= float(r["cg_residual"]) <= 1  # MINRES never lets the residual grow
        assert int(r["negative_curvature"]) >= 0
    # best.pt holds the weights of the best validation, loadable into the same network
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["iteration"] == int(max(val_rows, key=lambda r: float(r["accuracy"]))["iteration"])
    conv4(1, 3, hidden=8, image_size=8).load_state_dict(best["state_dict"])


def test_max_minutes_stops_training_and_validates_the_last_model(tmp_path):
    from imaml import conv4
    from imaml.train import train
    cfg = load_config(None, SYNTH + ["meta_iters=30", "max_minutes=0.00001"])
    messages = []
    summary = train(cfg, str(tmp_path / "run"), progress=True, log=messages.append,
                    network=conv4(1, 3, hidden=8, image_size=8), samplers=synthetic_samplers(),
                    progress_every_s=1e9)
    rows = read_metrics(tmp_path / "run")
    assert summary["iterations"] == 1  # the first iteration already spent the budget
    assert [(r["iteration"], r["split"]) for r in rows] == [("1", "train"), ("1", "val")]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))])
def test_training_on_a_device_matches_the_cpu(tmp_path, device):
    # the first outer step of a run on `device` (vmapped meta-batch, SGD with lr 1, so the
    # step is the meta-gradient) equals the per-task loop on the CPU in float32 to 2e-3
    # relative: float32 rounding in another summation order, amplified by 16 inner steps and
    # the linear solve, measured 3e-4 between the two CPU paths (float64: 1e-9, test_batched);
    # its checkpoint loads on the CPU
    from imaml import conv4
    from imaml.checkpoint import load_checkpoint
    from imaml.outer import mean_task_meta_gradient
    from imaml.registry import build_method
    from imaml.train import train
    # fixed steps and no tolerance: accept/reject and stopping decisions can flip on float32
    # rounding between two summation orders, and then the two paths part by more than 1e-4
    cfg = load_config(None, SYNTH + ["meta_iters=1", "outer=sgd", "outer_lr=1", f"device={device}",
                                     "inner_adaptive=false", "inner_tol=0", "inner_lr=0.05"])
    torch.manual_seed(0)
    net = conv4(1, 3, hidden=8, image_size=8)
    fm = FunctionalModel(net)
    theta0 = fm.theta()
    tasks = synthetic_samplers()[0].batch(range(cfg.meta_batch)).tasks()
    ref, _ = mean_task_meta_gradient(build_method(cfg.method_config()), fm, theta0, tasks)
    train(cfg, str(tmp_path / "run"), progress=False, network=net, samplers=synthetic_samplers())
    state = load_checkpoint(tmp_path / "run" / "last.pt")["state_dict"]
    assert all(t.device.type == "cpu" for t in state.values())
    step = theta0 - torch.cat([state[n].flatten() for n in fm.names])
    assert float((step - ref).norm() / ref.norm()) < 2e-3


def test_unavailable_device_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from imaml.distributed import resolve_device
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be"):
        load_config(None, ["device=gpu"])


@pytest.mark.slow
def test_learned_lambda_trains_checkpoints_and_resumes_exactly(tmp_path):
    """learn_lam: one λ per parameter tensor moves under the implicit λ-gradient; the
    checkpoint carries it (MetaModel and the evaluation use it), and a run resumed half-way
    ends with the λ and weights of the uninterrupted run."""
    from imaml import conv4
    from imaml.checkpoint import MetaModel
    from imaml.train import train
    over = SYNTH + ["learn_lam=true", "lam_lr=0.05", "checkpoint_every=5", "val_every=10"]

    def run(out, iters, resume=False):
        torch.manual_seed(0)
        return train(load_config(None, over + [f"meta_iters={iters}"]), str(out), resume=resume,
                     progress=False, network=conv4(1, 3, hidden=8, image_size=8),
                     samplers=synthetic_samplers())

    whole = run(tmp_path / "whole", 10)
    lam = whole["learned_lam"]
    assert len(lam) == 18 and len({round(v, 6) for v in lam.values()}) > 1
    assert all(0 < v < 10 for v in lam.values())
    # every tensor the support loss depends on moved from λ = 2; the convolution biases, which
    # batch norm cancels (φ = θ there, so ∂L_test/∂λ = −(φ − θ)·w = 0), did not
    conv_biases = {"0.bias", "3.bias", "6.bias", "9.bias"}
    assert {k for k, v in lam.items() if v == 2.0} == conv_biases
    run(tmp_path / "half", 5)
    resumed = run(tmp_path / "half", 10, resume=True)
    assert resumed["learned_lam"] == lam
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "half" / "last.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["learned_lam"] == list(lam.values())
    # the loaded model adapts with the learned λ, one value per parameter
    info = {k: v for k, v in a.items() if k != "state_dict"}
    net = conv4(1, 3, hidden=8, image_size=8)
    net.load_state_dict(a["state_dict"])
    from imaml.registry import build_method
    mm = MetaModel(net, build_method(a["method"]), info)
    assert mm.method.lam.shape == (mm.model.num_params,)
    first = mm.model.names[0]
    assert float(mm.method.lam[0]) == pytest.approx(lam[first], rel=1e-6)


@pytest.mark.parametrize("extra", [
    ["learn_lam=true", "lam_lr=0.05"],
    ["method=reptile", "inner_optimizer=adam", "inner_lr=0.01", "inner_steps=3",
     "inner_carry=true", "outer=sgd", "outer_lr=0.5"]], ids=["learned_lam", "carried_moments"])
def test_the_trainer_takes_the_outer_step_that_meta_step_takes(tmp_path, extra):
    """One outer step for the trainer and for a user's loop: three iterations of ``train`` end
    with the weights (and learned λ, or carried moments) that three ``meta_step`` calls reach
    on the same tasks from the same network, optimizer and state."""
    from imaml import FunctionalModel, conv4, meta_step
    from imaml.outer import LearnedLam
    from imaml.registry import adapt_names, build_method
    from imaml.train import train
    cfg = load_config(None, SYNTH + extra + ["meta_iters=3", "batching=loop", "val_every=100"])
    torch.manual_seed(0)
    summary = train(cfg, str(tmp_path / "run"), progress=False,
                    network=conv4(1, 3, hidden=8, image_size=8), samplers=synthetic_samplers())
    trained = load_checkpoint(tmp_path / "run" / "last.pt")
    torch.manual_seed(0)
    net = conv4(1, 3, hidden=8, image_size=8)
    model = FunctionalModel(net, adapt=adapt_names(cfg.method_config()))
    opt = (torch.optim.Adam(net.parameters(), lr=cfg.outer_lr) if cfg.outer == "adam"
           else torch.optim.SGD(net.parameters(), lr=cfg.outer_lr))
    learned = LearnedLam(model, cfg.lam, cfg.lam_lr) if cfg.learn_lam else None
    method, sampler, state = build_method(cfg.method_config()), synthetic_samplers()[0], None
    for it in range(3):
        tasks = list(sampler.batch(range(it * cfg.meta_batch, (it + 1) * cfg.meta_batch)).tasks())
        state = meta_step(method, model, opt, tasks, state, learned).state
    for k, v in net.state_dict().items():
        assert torch.allclose(trained["state_dict"][k], v, rtol=1e-5, atol=1e-7), k
    if learned is not None:
        assert summary["learned_lam"] == pytest.approx(learned.values(), rel=1e-6)
        assert len(set(learned.values().values())) > 1
    else:
        assert trained["inner_t"] == state.inner_t == 9
        assert torch.allclose(trained["inner_moments"], state.moments, rtol=1e-5, atol=1e-12)


def test_carried_adam_moments_train_checkpoint_and_resume_exactly(tmp_path):
    """inner_carry (Reptile's own code never resets Adam): the moments run on from one
    meta-iteration to the next, the checkpoint keeps them (a resumed run ends as the
    uninterrupted one did), and a loaded model adapts from them."""
    from imaml import conv4
    from imaml.train import train
    over = SYNTH + ["method=reptile", "inner_optimizer=adam", "inner_lr=0.01", "inner_steps=3",
                    "inner_carry=true", "outer=sgd", "outer_lr=0.5", "checkpoint_every=2",
                    "val_every=4", "batching=loop"]

    def run(out, iters, resume=False):
        torch.manual_seed(0)
        return train(load_config(None, over + [f"meta_iters={iters}"]), str(out),
                     resume=resume, progress=False, network=conv4(1, 3, hidden=8, image_size=8),
                     samplers=synthetic_samplers())

    run(tmp_path / "whole", 4)
    run(tmp_path / "half", 2)
    run(tmp_path / "half", 4, resume=True)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "half" / "last.pt")
    assert a["inner_t"] == b["inner_t"] == 4 * 3  # 4 meta-iterations of 3 Adam steps
    assert torch.equal(a["inner_moments"], b["inner_moments"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert bool((a["inner_moments"][1] > 0).any()) and bool((a["inner_moments"][1] >= 0).all())
    from imaml.registry import build_method
    net = conv4(1, 3, hidden=8, image_size=8)
    net.load_state_dict(a["state_dict"])
    mm = MetaModel(net, build_method(a["method"]), {k: v for k, v in a.items() if k != "state_dict"})
    assert mm.method.inner.t0 == 12 and torch.equal(mm.method.inner.v0, a["inner_moments"][1])
    # imaml eval --inner-steps 7 keeps them (it dropped them before)
    from imaml.cli import overridden_method
    changed = overridden_method(mm, {"inner_steps": 7}).inner
    assert changed.steps == 7 and changed.t0 == 12 and torch.equal(changed.m0, a["inner_moments"][0])
    # (batched and looped moments agree in float64: tests/test_batched.py)
    with pytest.raises(ValueError, match="inner_carry carries the moments of an Adam"):
        load_config(None, ["method=reptile", "inner_carry=true"])


def test_learn_lam_is_refused_for_a_method_without_lambda():
    with pytest.raises(ValueError, match="learn_lam learns iMAML's λ"):
        load_config(None, ["method=maml", "learn_lam=true"])


def test_adapt_config_trains_the_body_as_meta_only(tmp_path):
    """adapt='13.' (the head): the inner loop moves only the head, the outer loop still learns
    the body, and a loaded checkpoint adapts the same parameters."""
    from imaml import conv4
    from imaml.registry import build_method
    torch.manual_seed(0)
    net = conv4(1, 3, hidden=8, image_size=8)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    from imaml.train import train
    train(load_config(None, SYNTH + ["meta_iters=3", "adapt=13."]), str(tmp_path / "run"),
          progress=False, network=net, samplers=synthetic_samplers())
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["method"]["adapt"] == "13."
    assert not torch.equal(ck["state_dict"]["0.weight"], start["0.weight"])  # body meta-learned
    mm = MetaModel(net, build_method(ck["method"]), {k: v for k, v in ck.items() if k != "state_dict"})
    assert mm.model.adapted_names() == ["13.weight", "13.bias"]
    task = synthetic_samplers()[1].batch([0])[0]
    phi = mm.adapt(task.x_support, task.y_support)
    body = mm.model.adapt_mask == 0
    assert torch.equal(phi[body], mm.model.theta()[body])
    with pytest.raises(ValueError, match="adapt names no parameter"):
        train(load_config(None, SYNTH + ["meta_iters=1", "adapt=head"]), str(tmp_path / "bad"),
              progress=False, network=conv4(1, 3, hidden=8, image_size=8),
              samplers=synthetic_samplers())


def test_reptile_settings_linear_schedule_train_shots_and_adam(monkeypatch):
    from imaml import Adam, Reptile
    from imaml.registry import build_method
    from imaml.train import _samplers
    cfg = load_config(None, ["method=reptile", "inner_optimizer=adam", "inner_lr=0.001",
                             "inner_steps=5", "inner_batch=10", "train_shots=3",
                             "lr_schedule=linear", "outer=sgd", "outer_lr=1.0",
                             "outer_lr_min=0", "meta_iters=101"])
    m = build_method(cfg.method_config())
    assert isinstance(m, Reptile) and isinstance(m.inner, Adam) and m.inner.batch_size == 10
    assert [outer_lr_at(cfg, i) for i in (1, 51, 101)] == [1.0, 0.5, 0.0]
    timed = load_config(None, ["lr_schedule=linear-time", "max_minutes=10", "outer_lr=1",
                               "outer_lr_min=0"])
    assert outer_lr_at(timed, 7, elapsed=150.0) == pytest.approx(0.75)
    # the meta-train split gets train_shots, meta-val the evaluation's shots
    import imaml.data
    monkeypatch.setattr(imaml.data, "load_split", lambda *a, **k: synthetic_samplers()[0].classes)
    train, val = _samplers(cfg, None)
    assert (train.shots, val.shots) == (3, 1)
    with pytest.raises(ValueError, match="inner_optimizer 'adam' is for fomaml and reptile"):
        load_config(None, ["method=imaml-gd", "inner_optimizer=adam"])
