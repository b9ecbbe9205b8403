"""Sphinx configuration of the dmljax documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (``-W``: every warning is an error).

The API pages are generated here, at every build, from the ``__all__`` of every public dmljax module
(``docs/api/`` is written by :func:`write_api_pages` and not kept in git), so a name another developer
adds to an ``__all__`` gets its page without editing the docs.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dmljax  # noqa: E402

project = "dmljax"
author = "dmljax developers"
copyright = "dmljax developers"
release = dmljax.__version__ if hasattr(dmljax, "__version__") else "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # MyST markdown (myst-parser) + executed notebooks
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "jupyter_execute", ".jupyter_cache", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as field lists, not duplicate attribute entries
napoleon_use_rtype = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("DMLJAX_DOCS_EXECUTE", "cache")
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_cache_path = str(DOCS / "_build" / ".jupyter_cache")

html_theme = "alabaster"
html_title = "dmljax"

# the README is included by some guides; its relative links point into the repository.
# ref.python: napoleon reads the first words of a "Returns:" line as a type and Sphinx warns
# when such a word ("labels", "embeddings") names attributes of several classes.
suppress_warnings = ["myst.xref_missing", "ref.python"]


def public_modules() -> list[str]:
    """Every importable public module of dmljax (no ``_private`` component), packages first."""
    names = ["dmljax"]
    for info in pkgutil.walk_packages(dmljax.__path__, "dmljax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def api_entries() -> dict[str, list[str]]:
    """Module -> the names of its ``__all__`` documented on its page.

    Each object is documented once, on the page of the module that defines it (a package that
    re-exports a submodule's name links to that page instead); names that are submodules are
    skipped (they have their own page).
    """
    modules = {name: importlib.import_module(name) for name in public_modules()}
    listed: dict[str, list[str]] = {}
    for name, module in modules.items():
        listed[name] = [n for n in getattr(module, "__all__", []) if not n.startswith("__")]
    owner: dict[int, str] = {}
    for name, module in modules.items():
        for attr in listed[name]:
            obj = getattr(module, attr)
            if isinstance(obj, type(sys)):
                continue
            home = getattr(obj, "__module__", None)
            key = id(obj)
            if key not in owner or (home == name) or (owner[key] != home and name.startswith(owner[key] + ".")):
                owner[key] = name
    entries: dict[str, list[str]] = {}
    for name, module in modules.items():
        entries[name] = [attr for attr in listed[name]
                         if not isinstance(getattr(module, attr), type(sys)) and owner[id(getattr(module, attr))] == name]
    return entries


def write_api_pages() -> None:
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    entries = api_entries()
    index = ["API reference", "=============", "",
             "One page per public module, generated from the docstrings; every name of a module's",
             "``__all__`` has its own page.", "", ".. toctree::", "   :maxdepth: 1", ""]
    for name, names in entries.items():
        index.append(f"   {name}")
        lines = [name, "=" * len(name), "", f".. automodule:: {name}", "   :no-members:", ""]
        if names:
            lines += [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
            lines += [f"   {n}" for n in names]
            lines.append("")
        new = "\n".join(lines)
        page = api / f"{name}.rst"
        if not page.is_file() or page.read_text() != new:  # unchanged pages keep their mtime
            page.write_text(new)
    new_index = "\n".join(index) + "\n"
    if not (api / "index.rst").is_file() or (api / "index.rst").read_text() != new_index:
        (api / "index.rst").write_text(new_index)


write_api_pages()


def _drop_inherited_type_docstring(app, what, name, obj, options, lines):
    """A module constant (a dict, a tuple) has no docstring of its own: autodoc would show its
    type's (``dict()`` -> new empty dictionary ...), which is not about dmljax."""
    type_doc = getattr(type(obj), "__doc__", None)
    if what in ("data", "attribute") and isinstance(type_doc, str) and "\n".join(lines).strip() == type_doc.strip():
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_inherited_type_docstring)
