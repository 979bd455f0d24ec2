"""The README's Python example must run as written."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["pred"].shape == (12,)
    assert ns["res"].grad.shape == ns["model"].theta().shape


def test_readme_implicit_layer_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    exec(compile(blocks[1], "README.md", "exec"), ns)
    assert ns["theta"].grad.shape == ns["theta"].shape and bool(ns["theta"].grad.norm() > 0)
    assert ns["log_lam"].grad.shape == (len(ns["model"].names),)
    assert ns["record"]["linear"].iterations == 5


def test_readme_model_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    ns = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    before = {k: v.clone() for k, v in ns["net"].state_dict().items()}
    exec(compile(blocks[2], "README.md", "exec"), ns)
    assert set(ns["grads"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(float(g.norm()) > 0 for g in ns["grads"].values())  # the body gets a gradient
    assert ns["params"]["0.weight"].grad.shape == (32, 8)
    assert ns["labels"].shape == (12,)
    assert all(torch.equal(before[k], v) for k, v in ns["net"].state_dict().items())
