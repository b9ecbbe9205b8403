"""The documentation: the Sphinx build (warnings are errors), the API coverage of the public names,
and the executed tutorial."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

pytest.importorskip("sphinx", reason="sphinx (the dmljax[docs] extra, part of dev) builds the docs")


def _conf():
    """docs/conf.py as a module (it generates the API pages from the ``__all__`` lists)."""
    spec = importlib.util.spec_from_file_location("dmljax_docs_conf", DOCS / "conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_without_warnings(tmp_path):
    """``sphinx -W``: any warning (a docstring that is not valid reStructuredText, a broken
    reference, a missing page) fails the build. The tutorial is executed by its own test below."""
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), "-D", "nb_execution_mode=off", str(DOCS), str(tmp_path / "html")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, "sphinx warnings:\n" + out.stderr[-8000:]
    assert (tmp_path / "html" / "api" / "generated" / "dmljax.metrics.retrieval.map_at_r.html").is_file()


# Subpackages (or top-level modules) whose every public name must have an API page AND an executed
# `Examples:` doctest. Add a subpackage here once its docstrings have examples.
ENFORCED = ["dmljax.metrics", "dmljax.regularizers", "dmljax.data"]


def _public_names(package: str, entries: dict[str, list[str]]) -> list[tuple[str, str]]:
    return [(module, name) for module, names in entries.items()
            if module == package or module.startswith(package + ".") for name in names]


@pytest.fixture(scope="module")
def api_entries():
    return _conf().api_entries()


@pytest.mark.parametrize("package", ENFORCED)
def test_every_public_name_has_an_api_page_and_an_executed_example(package, api_entries):
    names = _public_names(package, api_entries)
    assert names, f"no public names found for {package}"
    missing_page, missing_example = [], []
    pages = {(DOCS / "api" / f"{m}.rst").read_text() for m in {m for m, _ in names}}
    for module, name in names:
        if not any(f"\n   {name}\n" in page for page in pages):
            missing_page.append(f"{module}.{name}")
        obj = getattr(importlib.import_module(module), name)
        if not callable(obj):
            continue  # constants (e.g. KNN_METRICS) have an API entry, no example
        # DocTestFinder finds exactly what `pytest --doctest-modules` (the test command) runs
        tests = doctest.DocTestFinder(recurse=False).find(obj, name=f"{module}.{name}", module=False)
        doc = obj.__doc__ or ""
        if "Examples:" not in doc or not any(t.examples for t in tests):
            missing_example.append(f"{module}.{name}")
    assert not missing_page, f"public names without an API page: {missing_page}"
    assert not missing_example, f"public names without an executed `Examples:` doctest: {missing_example}"


def test_api_pages_follow_the_all_lists(api_entries):
    """Every name of every public module's ``__all__`` is on exactly one API page."""
    seen = {}
    for module, names in api_entries.items():
        for name in names:
            obj = getattr(importlib.import_module(module), name)
            if callable(obj):
                assert id(obj) not in seen, f"{module}.{name} documented twice (also {seen[id(obj)]})"
                seen[id(obj)] = f"{module}.{name}"
    assert "dmljax.metrics.retrieval" in api_entries and "map_at_r" in api_entries["dmljax.metrics.retrieval"]


def test_tutorial_runs(tmp_path):
    """docs/tutorial.md (a MyST-NB notebook) executes top to bottom: losses + gradients, a short
    minimal-protocol Omniglot training, the evaluation table, the retrieval grid and ROC plots."""
    pytest.importorskip("nbclient")
    from myst_nb.core.read import read_myst_markdown_notebook
    from nbclient import NotebookClient

    nb = read_myst_markdown_notebook((DOCS / "tutorial.md").read_text())
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env_path) if p)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "recall@1" in text and "step  59" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # retrieval grid + ROC curves
