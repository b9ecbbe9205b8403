"""Package-level re-exports never shadow a submodule (``import dmljax.metrics.knn`` must be a module)."""

import importlib
import pkgutil
import types

import pytest

PACKAGES = ["dmljax", "dmljax.losses", "dmljax.mining", "dmljax.metrics", "dmljax.models", "dmljax.data",
            "dmljax.train", "dmljax.methods"]


@pytest.mark.parametrize("name", PACKAGES)
def test_no_export_shadows_a_submodule(name):
    package = importlib.import_module(name)
    for info in pkgutil.iter_modules(package.__path__):
        attr = getattr(package, info.name, None)
        assert attr is None or isinstance(attr, types.ModuleType), f"{name}.{info.name} is a {type(attr)}"


# --- the wheel a user installs ------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    build = tmp_path_factory.mktemp("wheel")
    # build from a copy without build/ or *.egg-info left by other builds in the checkout
    src = build / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "__pycache__",
                                                              ".ci-venv", "_build", ".pytest_cache", ".jupyter_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build), str(src)],
        check=True, cwd=build,
    )
    (path,) = build.glob("dmljax-*.whl")
    return path


def test_wheel_holds_only_the_dmljax_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    top = {n.split("/")[0] for n in names}
    assert top == {"dmljax", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, top
    assert "dmljax/py.typed" in names
    data = {n.rsplit("/", 1)[1] for n in names if n.startswith("dmljax/data/omniglot/")}
    # the Omniglot images ship once: no small-set zips (derived from the background archive)
    assert data == {"images_background.tar.xz", "images_evaluation.tar.xz", "all_runs.zip", "small_sets.json",
                    "README.md", "LICENSE"}, data
    assert "dmljax-train = dmljax.train.cli:main" in entry_points
    for field in ("Project-URL: Documentation", "Classifier: Typing :: Typed", "Keywords:", "Author:",
                  "Provides-Extra: tfds", "Provides-Extra: docs"):
        assert field in metadata, field
    # every Python module of the checkout's dmljax/ is in the wheel
    modules = {str(p.relative_to(REPO)) for p in (REPO / "dmljax").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))


def test_every_module_imports_without_tensorflow():
    """Walk every dmljax module in a fresh interpreter where ``import tensorflow`` fails."""
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['tensorflow'] = None\n"
        "import dmljax\n"
        "names = [m.name for m in pkgutil.walk_packages(dmljax.__path__, 'dmljax.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "assert 'dmljax.data.tfds' in names and len(names) > 40, names\n"
        "from dmljax.data import tfds\n"
        "try:\n"
        "    tfds.import_tensorflow()\n"
        "except ImportError as e:\n"
        "    assert 'dmljax[tfds]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
        "print(len(names))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_installed_wheel_runs_the_training_console_script(wheel, tmp_path):
    """A fresh venv outside the repo, the wheel (+ its dependencies from this interpreter's site
    packages), then ``dmljax-train --config omniglot_small``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    bin_dir = venv / "bin"
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   cwd=tmp_path)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(bin_dir / "dmljax-train"), "--config", "omniglot_small", "--workdir", str(run_dir / "run")],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the installed package, not the checkout, ran
    where = subprocess.run([str(bin_dir / "python"), "-c", "import dmljax, sys; print(dmljax.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where
    assert (run_dir / "run" / "final.json").is_file()
