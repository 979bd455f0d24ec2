"""The README: its quick start runs as written, it stays short, and it links to the docs and
RESULTS.md. (The Python blocks of docs/ are run by tests/test_docs.py.)"""
import math
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_quick_start_runs():
    blocks = python_blocks(README.read_text())
    assert blocks, "README has no python example"
    ns = {}
    for block in blocks:  # every Python block of the README, in order, in one namespace
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["pred"].shape == (12,) and ns["pred"].dtype == torch.int64
    assert math.isfinite(ns["summary"].query_loss)
    assert 0.0 <= ns["summary"].query_accuracy <= 1.0
    # the quick start is about ten lines of code, not a tutorial
    assert sum(1 for line in blocks[0].splitlines() if line.strip()) <= 20


def test_readme_is_short_and_links_to_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    for target in ("RESULTS.md", "docs/getting-started.md", "docs/reproducing.md", "CITATION.cff",
                   "CONTRIBUTING.md"):
        assert f"]({target}" in text, f"README does not link to {target}"
    # the set-up story: the two scripts
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
    assert "bash scripts/docs.sh" in text
