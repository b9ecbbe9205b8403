"""The README's user-written training loop, run exactly as printed (on the toy data source)."""

import pathlib
import re

import numpy as np

import dmljax.configs
from dmljax.train.cli import apply_overrides

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
TOY = ["data.name=toy", "data.image_size=8", "model.channels=(4,8)", "model.num_pools=2", "model.embedding_dim=8",
       "sampler.classes_per_batch=4", "sampler.samples_per_class=4", "optim.num_steps=3", "optim.warmup_steps=1"]


def readme_loop() -> str:
    text = README.read_text()
    start = text.index("Your own training loop")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_loop_is_short_and_uses_library_parts_only():
    code = readme_loop()
    assert len(code.strip().splitlines()) < 40
    imports = [line for line in code.splitlines() if line.startswith(("import", "from"))]
    assert all(line.startswith(("import jax", "from dmljax")) for line in imports), imports
    assert not re.search(r"^\s*(class|def) ", code, re.M)  # no model or loss defined by the user


def test_readme_loop_runs(monkeypatch, capsys):
    real = dmljax.configs.get_config
    monkeypatch.setattr(dmljax.configs, "get_config", lambda name: apply_overrides(real(name), TOY))
    namespace: dict = {}
    exec(compile(readme_loop(), str(README), "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    first = out[0].split()
    assert first[0] == "0" and np.isfinite(float(first[1])) and 0.0 <= float(first[2]) <= 1.0
    metrics = eval(out[-1], {})  # the printed evaluation dict
    assert 0.0 <= metrics["recall@1"] <= 1.0 and "map_at_r" in metrics
    assert int(namespace["state"].step) == 3
