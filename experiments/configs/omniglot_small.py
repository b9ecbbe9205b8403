"""Minimal Omniglot protocol (fast demos/tests): train background_small1 (136 characters),
test on the small2 alphabets not in small1 (106 characters). See the data README."""

from experiments.configs import omniglot


def get_config():
    c = omniglot.get_config()
    c.workdir = "runs/omniglot_small"
    c.data.train_split = "background_small1"
    c.data.test_split = "minimal_test"
    # the input pipeline of the issue 7 / 8 comparisons (experiments/results/issue{7,8}_comparison),
    # kept when the standard config moved to 32 px + elastic distortion, so their seeds stay comparable
    c.data.image_size = 28
    c.augment.elastic_alpha = 0.0
    c.sampler.name = "m_per_class"  # random classes, as in the issue 7 / 8 comparisons
    c.eval.precise_bn_batches = 0  # running averages, as in the issue 7 / 8 comparisons
    c.eval.tta_shifts = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))  # 9 views at every
    c.eval.final_tta_shifts = ()  # evaluation, the last one too
    c.optim.num_steps = 300
    c.optim.warmup_steps = 30
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    return c
