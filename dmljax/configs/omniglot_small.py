"""Minimal Omniglot protocol (fast demos/tests): train background_small1 (136 characters),
test on the small2 alphabets not in small1 (106 characters). See the data README.

Keeps the input pipeline of the method comparisons (experiments/results/methods_comparison.md,
tasks_comparison.md): 28 px, no elastic distortion, random classes per batch, BN running
averages, 9 test-time views at every evaluation."""

from dmljax.configs import omniglot


def get_config():
    c = omniglot.get_config()
    c.workdir = "runs/omniglot_small"
    c.data.train_split = "background_small1"
    c.data.test_split = "minimal_test"
    c.data.image_size = 28
    c.augment.elastic_alpha = 0.0
    c.sampler.name = "m_per_class"
    c.eval.precise_bn_batches = 0
    c.eval.tta_shifts = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    c.eval.final_tta_shifts = ()
    c.optim.num_steps = 300
    c.optim.warmup_steps = 30
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    return c
