"""dmljax.configs: every config loads locked; base holds every key the dataset configs use."""

import pytest

from dmljax.configs import CONFIGS, get_config
from dmljax.train.cli import apply_overrides, config_keys


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_locked(name):
    c = get_config(name)
    with pytest.raises((AttributeError, KeyError)):
        c.not_a_key = 1


@pytest.mark.parametrize("name", ["omniglot", "omniglot_small", "cub200_resnet50", "sop_resnet50"])
def test_trainer_configs_add_no_keys_to_base(name):
    """The trainer reads every key without a fallback: a dataset config only changes base's values
    (free-form ``options`` nodes aside)."""
    keys = {k for k in config_keys(get_config(name)) if ".options." not in k}
    assert keys == set(config_keys(get_config("base")))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="did you mean 'omniglot'"):
        get_config("omniglott")
    with pytest.raises(ValueError, match="did you mean 'eval.precise_bn_batches'"):
        apply_overrides(get_config("omniglot"), ["eval.precise_bn_batch=3"])
    c = apply_overrides(get_config("omniglot"), ["loss.options.mining=False", "optim.learning_rate=1"])
    assert c.loss.options.mining is False and c.optim.learning_rate == 1.0
