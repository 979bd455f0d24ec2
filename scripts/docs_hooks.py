"""MkDocs hooks of the documentation site (mkdocs.yml, ``hooks:``): the pages that are generated,
never written by hand, and the links between the repository's own Markdown files and the site.

- ``reference/config.md``: every field of ``imaml.config.TrainConfig`` with its type, default and
  the comment beside it in ``src/imaml/config.py`` (read with ``ast`` and ``tokenize``, so the
  reference cannot drift from the dataclass).
- ``reference/api.md``: one mkdocstrings entry (``::: imaml.NAME``) for every name in
  ``imaml.__all__`` (read from ``src/imaml/__init__.py``), grouped by the module defining it.
- ``results.md``, ``contributing.md``, ``changelog.md``: RESULTS.md, CONTRIBUTING.md and
  CHANGELOG.md from the repository root, their links rewritten for the site.

Links: the Markdown files are written to read on a repository browser too, so a page's link to a
root file (``../RESULTS.md`` from ``docs/x.md``) or a root file's link into ``docs/``
(``docs/runs/r/NOTES.md`` from RESULTS.md) is rewritten to the site's page. A link to any other
file outside ``docs/`` is left alone, and MkDocs' strict build then fails on it.

Run by ``bash scripts/docs.sh``; ``config_reference()`` and ``api_reference()`` are also called by
``tests/test_docs.py``.
"""
from __future__ import annotations

import ast
import io
import posixpath
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "imaml"

# root file -> the page generated from it
ROOT_PAGES = {"RESULTS.md": "results.md", "CONTRIBUTING.md": "contributing.md",
              "CHANGELOG.md": "changelog.md", "README.md": "index.md"}
GENERATED_FROM_ROOT = {"results.md": "RESULTS.md", "contributing.md": "CONTRIBUTING.md",
                       "changelog.md": "CHANGELOG.md"}

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")

# ---------------------------------------------------------------------------------------------
# the config reference


def _comments(source: str):
    """{line number: comment text} for every comment in ``source``."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def config_fields(path: Path = SRC / "config.py"):
    """[(name, type, default, description, section)] for each field of TrainConfig, in order.

    The description is the comment at the end of the field's line, after the comment lines
    directly above it; the first of those lines is a section heading instead when it is a few
    lower-case words, optionally with a remark in parentheses (``# data``, ``# outer loop``)."""
    source = path.read_text()
    lines = source.splitlines()
    comments = _comments(source)
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    fields, section, classes = [], "", _class_defaults()
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, i = [], node.lineno - 1
        while i >= 1 and lines[i - 1].strip().startswith("#"):
            above.insert(0, comments.get(i, ""))
            i -= 1
        heading = re.fullmatch(r"([a-z][a-z ,]*?)\s*(\(.*\))?", above[0]) if above else None
        if heading:
            above.pop(0)
            section = heading.group(1)
        desc = " ".join(above + ([comments[node.lineno]] if node.lineno in comments else []))
        default = ast.get_source_segment(source, node.value) if node.value is not None else ""
        if default:
            default = _literal(default, classes)
        fields.append((node.target.id, ast.get_source_segment(source, node.annotation),
                       default, desc, section))
    return fields


def _class_defaults():
    """{class: ({attribute: default as written}, [base names])} of the classes in the package's
    modules, read from the source (the docs build does not import the package, nor torch)."""
    found = {}
    for path in sorted(SRC.glob("*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                attrs = {n.target.id: ast.get_source_segment(source, n.value) for n in node.body
                         if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                         and n.value is not None}
                found[node.name] = (attrs, [b.id for b in node.bases if isinstance(b, ast.Name)])
    return found


def _literal(default: str, classes) -> str:
    """A field's default as a literal: as written, or, where it names another class's default
    (``lam: float = IMAML.lam``), that class's (or its bases') default, as written there
    (``classes``: ``_class_defaults()``)."""
    m = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)", default)
    if not m:
        return default
    todo = [m.group(1)]
    while todo:
        attrs, bases = classes[todo.pop(0)]
        if m.group(2) in attrs:
            return _literal(attrs[m.group(2)], classes)
        todo += bases
    raise ValueError(f"no default {default} in the package's classes")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _mentions(docs_dir: Path = ROOT / "docs"):
    """{page: text} of the hand-written top-level pages, where a field's prose lives."""
    return {p.name: p.read_text() for p in sorted(docs_dir.glob("*.md"))}


def _title(text: str, name: str) -> str:
    m = re.search(r"^# (.+)$", text, flags=re.M)
    return m.group(1).strip() if m else name


def config_reference() -> str:
    """The Markdown of the config reference page: the dataclass's fields, and for each the
    pages that mention it in code (`field`, `field=...` or `field: ...`)."""
    pages = _mentions()
    out = ["# Config reference", "",
           "<!-- Generated by scripts/docs_hooks.py from the TrainConfig dataclass in "
           "src/imaml/config.py at every build: edit the dataclass, not this page. -->", "",
           "Every field of `imaml.config.TrainConfig`, the settings of `imaml train`, with its type, "
           "its default and the comment beside it in `src/imaml/config.py`. A config file is a "
           "JSON object holding any subset of the fields (keys starting with `_` are comments); "
           "`field=value` on the command line overrides one. An unknown field, a value of the "
           "wrong type or an impossible value stops `imaml train` before anything runs "
           "(`TrainConfig.validate`). How the fields are used: [Training](../training.md).", ""]
    section = None
    for name, typ, default, desc, sec in config_fields():
        if sec != section:
            section = sec
            out += ["", f"## {sec.capitalize() if sec else 'Other'}", "",
                    "| field | type | default | what it is | explained in |", "|---|---|---|---|---|"]
        used = re.compile(r"`" + re.escape(name) + r"(`|[=:])")
        where = ", ".join(f"[{_title(text, page)}](../{page})" for page, text in pages.items()
                          if used.search(text))
        out.append(f"| `{name}` | `{_cell(typ)}` | `{_cell(default)}` | {_cell(desc)} | {where} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the API reference


def public_names(path: Path = SRC / "__init__.py"):
    """{name: defining module} for every name in ``imaml.__all__``, read without importing."""
    tree = ast.parse(path.read_text())
    origin = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                origin[alias.asname or alias.name] = f"imaml.{node.module}"
    names = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets))
    return {n: origin.get(n, "imaml") for n in names}


MODULE_TITLES = {
    "imaml.functional": "Models and the inner problem (`imaml.functional`)",
    "imaml.inner": "Inner solvers (`imaml.inner`)",
    "imaml.linear": "Linear solvers (`imaml.linear`)",
    "imaml.meta": "Meta-gradient methods (`imaml.meta`)",
    "imaml.implicit": "The implicit layer (`imaml.implicit`)",
    "imaml.tasks": "Tasks (`imaml.tasks`)",
    "imaml.models": "Networks (`imaml.models`)",
    "imaml.outer": "The outer step (`imaml.outer`)",
    "imaml.checkpoint": "Meta-trained models (`imaml.checkpoint`)",
}


def api_reference() -> str:
    """The Markdown of the API reference page: every name of ``imaml.__all__``."""
    by_module = {}
    for name, module in public_names().items():
        by_module.setdefault(module, []).append(name)
    out = ["# API reference", "",
           "<!-- Generated by scripts/docs_hooks.py from imaml.__all__ at every build. -->", "",
           "Every name that `import imaml` exports (`imaml.__all__`), with its docstring, grouped "
           "by the module that defines it. Use them as `imaml.NAME`.", ""]
    order = list(MODULE_TITLES) + sorted(set(by_module) - set(MODULE_TITLES))
    out += ["| module | names |", "|---|---|"]
    for module in order:
        if module in by_module:
            out.append(f"| `{module}` | " + ", ".join(f"[`{n}`](#imaml.{n})"
                                                      for n in by_module[module]) + " |")
    for module in order:
        if module not in by_module:
            continue
        out += ["", f"## {MODULE_TITLES.get(module, f'`{module}`')}", ""]
        for name in by_module[module]:
            out += [f"::: imaml.{name}", "    options:", "      heading_level: 3", ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# links between the repository's Markdown and the site


def _split(target: str):
    for sep in ("#", "?"):
        if sep in target:
            i = target.index(sep)
            return target[:i], target[i:]
    return target, ""


def rewrite_links(markdown: str, repo_path: str, site_path: str) -> str:
    """Rewrite the relative links of a file at ``repo_path`` (repository-relative) that is the
    site page ``site_path`` (docs-relative): a link into docs/ goes to the same file in the site,
    a link to a root file that the site has a page for goes to that page."""
    repo_dir = posixpath.dirname(repo_path)
    site_dir = posixpath.dirname(site_path)

    def fix(m):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return m.group(0)
        path, rest = _split(target)
        if not path:
            return m.group(0)
        resolved = posixpath.normpath(posixpath.join(repo_dir, path))
        if resolved.startswith("docs/"):
            new = resolved[len("docs/"):]
        elif resolved in ROOT_PAGES:
            new = ROOT_PAGES[resolved]
        else:
            return m.group(0)
        rel = posixpath.relpath(new, site_dir or ".")
        return f"{m.group(1)}{rel}{rest}{m.group(3)}"

    return _LINK.sub(fix, markdown)


# ---------------------------------------------------------------------------------------------
# MkDocs events

# pages that other work adds: (nav section, title, page), put in the nav when the page exists
OPTIONAL_PAGES = [("Results", "Table 1 study", "table1.md")]


def run_notes(docs_dir: Path):
    """[{run: 'runs/<run>/NOTES.md'}] for every recorded run with notes, sorted by name."""
    return [{p.parent.name: p.relative_to(docs_dir).as_posix()}
            for p in sorted(docs_dir.glob("runs/*/NOTES.md"))]


def on_config(config):
    docs_dir = Path(config["docs_dir"])
    nav = config["nav"]
    sections = {next(iter(item)): item[next(iter(item))] for item in nav if isinstance(item, dict)}
    listed = {str(v) for item in nav for v in _leaves(item)}
    for section, title, page in OPTIONAL_PAGES:
        if (docs_dir / page).is_file() and page not in listed and section in sections:
            sections[section].insert(2, {title: page})
    notes = run_notes(docs_dir)
    if notes and "Results" in sections:
        sections["Results"].append({"Run notes": notes})
    return config


def _leaves(item):
    if isinstance(item, dict):
        for v in item.values():
            yield from _leaves(v)
    elif isinstance(item, list):
        for v in item:
            yield from _leaves(v)
    else:
        yield item


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, text in (("reference/config.md", config_reference()),
                      ("reference/api.md", api_reference())):
        files.append(File.generated(config, uri, content=text))
    for uri, name in GENERATED_FROM_ROOT.items():
        path = ROOT / name
        if path.is_file():
            files.append(File.generated(config, uri, content=path.read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    uri = page.file.src_uri
    if uri in GENERATED_FROM_ROOT:
        return rewrite_links(markdown, GENERATED_FROM_ROOT[uri], uri)
    if uri.startswith("reference/"):
        return markdown
    return rewrite_links(markdown, "docs/" + uri, uri)
