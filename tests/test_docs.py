"""The documentation: every fenced code block is either run by the test suite or marked as a
shell command, every Python block of docs/ runs, the generated references cover the code, no
document cites a file that is not in the repository, and the site builds in strict mode with
every page and every internal link (and anchor) resolving.

The convention (CONTRIBUTING.md, "Code blocks in the documentation"): ```python blocks run;
```bash and ```console blocks are shell commands; nothing else. A page's Python blocks run in
order in one namespace; ``<!-- run-by: tests/test_x.py -->`` just above a block hands it to that
test, ``<!-- needs: omniglot -->`` runs it only with Omniglot in $IMAML_DATA.
"""
from __future__ import annotations

import dataclasses
import ast
import html
import importlib.util
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from conftest import HAVE_OMNIGLOT

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "scripts"))
import docs_hooks  # noqa: E402

SHELL = {"bash", "console"}
ROOT_FILES = ["README.md", "RESULTS.md", "CONTRIBUTING.md", "CHANGELOG.md"]
# pages the site generates (scripts/docs_hooks.py): links to them are valid in docs/
GENERATED = {"reference/config.md", "reference/api.md", *docs_hooks.GENERATED_FROM_ROOT}


def doc_files():
    return [ROOT / f for f in ROOT_FILES] + sorted(DOCS.rglob("*.md"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def fences(path: Path):
    """[(line, language, code, markers)] of every fenced block; markers are the HTML comments
    on the lines just above the opening fence."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)(.*)$", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).strip()
        markers, j = [], i - 1
        while j >= 0 and re.fullmatch(r"\s*<!--.*-->\s*", lines[j]):
            markers.insert(0, lines[j].strip()[4:-3].strip())
            j -= 1
        body, k = [], i + 1
        while k < len(lines) and lines[k].strip() != fence:
            body.append(lines[k][len(indent):] if lines[k].startswith(indent) else lines[k])
            k += 1
        assert k < len(lines), f"{rel(path)}:{i + 1}: a code block that is never closed"
        out.append((i + 1, lang, "\n".join(body) + "\n", markers))
        i = k + 1
    return out


def run_by(markers):
    return next((m.split(":", 1)[1].strip() for m in markers if m.startswith("run-by:")), None)


def test_every_code_block_is_run_or_marked_as_shell():
    problems = []
    for path in doc_files():
        for line, lang, code, markers in fences(path):
            where = f"{rel(path)}:{line}"
            if lang in SHELL:
                continue
            if lang != "python":
                problems.append(f"{where}: a ```{lang or '(no language)'} block: mark it ```bash or "
                                "```console if it is a shell command, ```python if it is run")
                continue
            runner = run_by(markers)
            if runner:
                test = ROOT / runner
                if not test.is_file() or rel(path) not in test.read_text():
                    problems.append(f"{where}: run-by {runner}, which does not name {rel(path)}")
            elif path.name == "README.md":
                continue  # tests/test_readme.py runs every Python block of the README
            elif DOCS not in path.parents:
                problems.append(f"{where}: a Python block that no test runs (add run-by)")
    assert not problems, "\n".join(problems)


def pages_with_python():
    return [rel(p) for p in sorted(DOCS.rglob("*.md"))
            if any(lang == "python" and not run_by(m) for _, lang, _, m in fences(p))]


def _own_model_before(ns):
    ns["_before"] = {k: v.clone() for k, v in ns["net"].state_dict().items()}


def _own_model_after(ns):
    assert set(ns["grads"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(float(g.norm()) > 0 for g in ns["grads"].values())  # the body gets a gradient
    assert ns["params"]["0.weight"].grad.shape == (32, 8)
    assert ns["labels"].shape == (12,)
    assert all(torch.equal(ns["_before"][k], v) for k, v in ns["net"].state_dict().items())
    assert ns["res2"].grad.shape == ns["two"].theta().shape


def _implicit_after(ns):
    assert ns["theta"].grad.shape == ns["theta"].shape and bool(ns["theta"].grad.norm() > 0)
    assert ns["log_lam"].grad.shape == (len(ns["model"].names),)
    assert ns["record"]["linear"].iterations == 5


def _getting_started_after(ns):
    assert ns["pred"].shape == (12,)
    assert ns["res"].grad.shape == ns["model"].theta().shape


def _data_after(ns):
    assert ns["batch"].x_support.shape[:2] == (16, 100)


# what each page's blocks must leave behind: (after its first block, after its last)
CHECKS = {
    "docs/own-model.md": (_own_model_before, _own_model_after),
    "docs/implicit-layer.md": (None, _implicit_after),
    "docs/getting-started.md": (None, _getting_started_after),
    "docs/data.md": (None, _data_after),
}


@pytest.mark.parametrize("page", pages_with_python())
def test_python_blocks_of_the_docs_run(page):
    blocks = [(line, code, markers) for line, lang, code, markers in fences(ROOT / page)
              if lang == "python" and not run_by(markers)]
    if any("needs: omniglot" in m for _, _, markers in blocks for m in markers) and not HAVE_OMNIGLOT:
        pytest.skip("this page's example reads Omniglot: set IMAML_DATA to a folder holding "
                    "omniglot/images_{background,evaluation}.zip")
    before, after = CHECKS.get(page, (None, None))
    ns = {"__name__": "docs_example"}
    for i, (line, code, _) in enumerate(blocks):
        exec(compile("\n" * (line) + code, page, "exec"), ns)  # line numbers as in the page
        if i == 0 and before:
            before(ns)
    if after:
        after(ns)


def test_checked_pages_have_their_blocks():
    assert set(CHECKS) <= set(pages_with_python())


def test_config_reference_is_the_dataclass():
    from imaml.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    generated = docs_hooks.config_fields()
    assert [name for name, *_ in generated] == list(fields)
    for name, typ, default, _, _ in generated:
        assert ast.literal_eval(default) == fields[name].default, name
    page = docs_hooks.config_reference()
    assert all(f"| `{name}` |" in page for name in fields)


def test_api_reference_lists_all_public_names():
    import imaml

    names = docs_hooks.public_names()
    assert list(names) == list(imaml.__all__)
    page = docs_hooks.api_reference()
    for name, module in names.items():
        assert f"::: imaml.{name}\n" in page
        assert getattr(imaml, name).__module__ == module, name
        assert (getattr(imaml, name).__doc__ or "").strip(), f"imaml.{name} has no docstring"


MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_no_document_cites_a_missing_file():
    # a file that is not in the repository, by name
    skip = {".venv", "site", "runs", "results", ".git", ".data", ".cache"}
    for top, dirs, files in os.walk(ROOT):
        if Path(top) == ROOT:
            dirs[:] = [d for d in dirs if d not in skip]
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".pytest_cache")]
        for name in files:
            if name.endswith((".md", ".py")):
                path = Path(top) / name
                assert "REFERENCE" + ".md" not in path.read_text(errors="replace"), rel(path)
    # every relative link of the Markdown files points at a file of the repository (or, from a
    # page of docs/, at a page the site generates)
    problems = []
    for path in doc_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for target in MD_LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            file = unquote(urlsplit(target).path)
            resolved = (path.parent / file).resolve()
            ok = resolved.exists()
            if not ok and DOCS in path.parents:
                ok = resolved.is_relative_to(DOCS) and \
                    resolved.relative_to(DOCS).as_posix() in GENERATED
            if not ok:
                problems.append(f"{rel(path)}: link to {target}")
    assert not problems, "\n".join(problems)


# -- the built site ---------------------------------------------------------------------------

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(errors="replace"))
    return p


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("MkDocs is not installed: bash scripts/docs.sh installs it (requirements-docs.txt)")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _nav_pages():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    return [p for item in config["nav"] for p in docs_hooks._leaves(item)]


def test_site_has_every_page_and_every_internal_link_resolves(site):
    pages = _nav_pages()  # the nav of mkdocs.yml, and what the hooks add to it
    pages += [v for d in docs_hooks.run_notes(DOCS) for v in d.values()]
    pages += [page for _, _, page in docs_hooks.OPTIONAL_PAGES if (DOCS / page).is_file()]
    for page in pages:
        assert (site / page).with_suffix(".html").is_file(), f"{page} was not built"
    # 404.html is served at any depth, so its links are absolute: not checked
    parsed = {p: _parse(p) for p in site.rglob("*.html") if p.name != "404.html"}
    problems = []
    for path, p in parsed.items():
        for link in p.links:
            u = urlsplit(html.unescape(link))
            if u.scheme or u.netloc or link.startswith(("mailto:", "javascript:", "data:")):
                continue
            target = (path.parent / unquote(u.path)).resolve() if u.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{path.relative_to(site)}: {link} (no such file)")
            elif u.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(u.fragment) not in ids:
                    problems.append(f"{path.relative_to(site)}: {link} (no such anchor)")
    assert not problems, "\n".join(problems[:50])


def test_site_api_reference_renders_every_name_with_its_docstring(site):
    import imaml

    text = (site / "reference" / "api.html").read_text()
    ids = _parse(site / "reference" / "api.html").ids
    plain = html.unescape(re.sub(r"<[^>]+>", " ", text))
    plain = re.sub(r"[`*\s]+", " ", plain)
    for name in imaml.__all__:
        assert f"imaml.{name}" in ids, f"imaml.{name} is not in the API reference"
        first = (getattr(imaml, name).__doc__ or "").strip().split("\n")[0]
        words = " ".join(re.sub(r"[`*\s]+", " ", first).split()[:3])
        assert words in plain, f"the docstring of imaml.{name} ({words!r}) is not rendered"


def test_site_holds_no_checkpoints_or_metrics(site):
    heavy = [p for p in site.rglob("*") if p.suffix in (".pt", ".log") or p.name.endswith(".csv.gz")]
    assert not heavy, heavy[:5]
