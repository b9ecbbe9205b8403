"""Cross-batch memory: ring buffer, PML CrossBatchMemory semantics against numpy loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmljax.memory import XBMState, with_xbm, xbm_enqueue, xbm_init, xbm_loss
from tests.utils import degenerate_batches, numerical_grad, random_batch


# ----------------------------------------------------------------------------- numpy reference


class NumpyXBM:
    """Plain-python ring buffer + loss, written from the XBM paper / PML CrossBatchMemory."""

    def __init__(self, size, dim):
        self.emb = np.zeros((size, dim))
        self.lab = np.zeros(size, int)
        self.filled = np.zeros(size, bool)
        self.ptr = 0
        self.size = size

    def enqueue(self, x, y, mask=None):
        slots = {}
        for i in range(len(x)):
            if mask is not None and not mask[i]:
                continue
            self.emb[self.ptr] = x[i]
            self.lab[self.ptr] = y[i]
            self.filled[self.ptr] = True
            slots[i] = self.ptr
            self.ptr = (self.ptr + 1) % self.size
        return slots

    def pairs(self, x, y, slots, mask=None):
        """(anchor, ref slot, is_positive) for every pair the loss sees, self-copies removed."""
        out = []
        for i in range(len(x)):
            if mask is not None and not mask[i]:
                continue
            for j in range(self.size):
                if not self.filled[j] or slots.get(i) == j:
                    continue
                out.append((i, j, y[i] == self.lab[j]))
        return out


def np_dist(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2)))


def np_cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_loss(name, mem, x, y, slots, mask=None, **kw):
    pairs = mem.pairs(x, y, slots, mask)
    if name == "contrastive":
        pm, nm = kw.get("pos_margin", 0.0), kw.get("neg_margin", 1.0)
        pos = [max(np_dist(x[i], mem.emb[j]) - pm, 0.0) for i, j, p in pairs if p]
        neg = [max(nm - np_dist(x[i], mem.emb[j]), 0.0) for i, j, p in pairs if not p]
        total = 0.0
        for vals in (pos, neg):
            nz = [v for v in vals if v > 0]
            total += sum(nz) / max(len(nz), 1)
        return total
    if name == "multi_similarity":
        a, b, base = 2.0, 50.0, 0.5
        per_anchor = []
        for i in range(len(x)):
            if mask is not None and not mask[i]:
                continue
            sp = [np_cos(x[i], mem.emb[j]) for ii, j, p in pairs if ii == i and p]
            sn = [np_cos(x[i], mem.emb[j]) for ii, j, p in pairs if ii == i and not p]
            lp = np.log(1 + sum(np.exp(-a * (s - base)) for s in sp)) / a
            ln = np.log(1 + sum(np.exp(b * (s - base)) for s in sn)) / b
            per_anchor.append(lp + ln)
        return float(np.mean(per_anchor))
    margin = kw.get("margin", 0.2)
    if kw.get("mining", "all") == "all":
        values = []
        for i, jp, p in pairs:
            if not p:
                continue
            for i2, jn, n in pairs:
                if i2 == i and not n:
                    values.append(max(np_dist(x[i], mem.emb[jp]) - np_dist(x[i], mem.emb[jn]) + margin, 0.0))
        nz = [v for v in values if v > 0]
        return sum(nz) / max(len(nz), 1)
    values = []  # batch hard
    for i in range(len(x)):
        dp = [np_dist(x[i], mem.emb[j]) for ii, j, p in pairs if ii == i and p]
        dn = [np_dist(x[i], mem.emb[j]) for ii, j, p in pairs if ii == i and not p]
        if dp and dn:
            values.append(max(max(dp) - min(dn) + margin, 0.0))
    nz = [v for v in values if v > 0]
    return sum(nz) / max(len(nz), 1)


# one jitted contrastive XBM step shared by several tests (same shapes: compiled once)
contrastive_step = jax.jit(functools.partial(xbm_loss, "contrastive"))

LOSSES = [
    ("contrastive", {}),
    ("contrastive", {"pos_margin": 0.1, "neg_margin": 0.8}),
    ("multi_similarity", {}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "batch_hard", "margin": 0.3}),
]


def _batches(steps, batch=4, dim=3, seed=0):
    out = []
    for s in range(steps):
        x, y = random_batch(seed + s, batch=batch, dim=dim, classes=3)
        out.append((x, y))
    return out


# ----------------------------------------------------------------------------- ring buffer


def test_enqueue_ring_buffer_wraps_around_like_a_fifo():
    state = xbm_init(5, 2, dtype=jnp.float64)
    assert isinstance(state, XBMState) and not bool(state.valid.any())
    ref = NumpyXBM(5, 2)
    rng = np.random.default_rng(0)
    masks = [None, np.array([True, False, True]), None, np.array([False, True, True])]
    for mask in masks:
        x, y = rng.normal(size=(3, 2)), rng.integers(0, 9, size=3).astype(np.int32)
        state = jax.jit(xbm_enqueue)(state, x, y, mask=mask)
        ref.enqueue(x, y, mask)
        np.testing.assert_array_equal(np.asarray(state.valid), ref.filled)
        np.testing.assert_allclose(np.asarray(state.embeddings)[ref.filled], ref.emb[ref.filled])
        np.testing.assert_array_equal(np.asarray(state.labels)[ref.filled], ref.lab[ref.filled])
        assert int(state.pointer) == ref.ptr
    assert ref.filled.all() and int(state.pointer) == (3 + 2 + 3 + 2) % 5


def test_enqueue_stores_constants():
    state = xbm_init(4, 2, dtype=jnp.float64)
    y = np.array([0, 1], np.int32)
    g = jax.grad(lambda z: jnp.sum(xbm_enqueue(state, z, y).embeddings ** 2))(np.ones((2, 2)))
    np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("name,kw", LOSSES)
def test_xbm_loss_matches_numpy_reference_over_steps(name, kw):
    """Three steps with batch 4 into 7 slots: partial fill, then wrap-around overwrites."""
    state = xbm_init(7, 3, dtype=jnp.float64)
    ref = NumpyXBM(7, 3)
    fn = jax.jit(functools.partial(xbm_loss, name, **kw))
    for x, y in _batches(3):
        value, state = fn(x, y, state)
        slots = ref.enqueue(x, y)
        expected = np_loss(name, ref, x, y, slots, **kw)
        np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name,kw", LOSSES[::2])
def test_padded_rows_are_neither_enqueued_nor_anchors(name, kw):
    state = xbm_init(9, 3, dtype=jnp.float64)
    ref = NumpyXBM(9, 3)
    mask = np.array([True, True, False, True, True, False])
    for x, y in _batches(2, batch=6, seed=3):
        x = x.copy()
        x[~mask] = 100.0  # garbage in padded rows must not matter
        value, state = xbm_loss(name, x, y, state, valid=mask, **kw)
        slots = ref.enqueue(x, y, mask)
        np.testing.assert_allclose(float(value), np_loss(name, ref, x, y, slots, mask, **kw), rtol=1e-5)
    assert int(np.sum(np.asarray(state.valid))) == 8


def test_no_self_pairs_and_masks_see_memory():
    """Every row's own copy is excluded; copies of the other batch rows and old items are pairs."""
    seen = {}

    def capture(mat, positive, negative):
        seen["pos"], seen["neg"] = positive, negative
        return jnp.sum(mat * positive)

    x, y = random_batch(0, batch=4, dim=3, classes=2)
    state = xbm_init(6, 3, dtype=jnp.float64)
    _, state = xbm_loss(capture, x, y, state)           # slots 0..3
    _, state = xbm_loss(capture, x + 0.5, y, state)     # slots 4, 5, 0, 1
    pos, neg = np.asarray(seen["pos"]), np.asarray(seen["neg"])
    own = [4, 5, 0, 1]
    for i in range(4):
        assert not pos[i, own[i]] and not neg[i, own[i]]
    # step 1 wrote y0..y3 into slots 0..3; step 2 wrote y0..y3 into slots 4, 5, 0, 1
    mem_labels = np.array([y[2], y[3], y[2], y[3], y[0], y[1]])
    expected_pos = (y[:, None] == mem_labels[None, :])
    expected_pos[np.arange(4), own] = False
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(neg, y[:, None] != mem_labels[None, :])


def test_first_step_equals_in_batch_loss():
    """With an empty memory the references are the batch's own copies: the in-batch loss."""
    from dmljax.losses.pair import contrastive_loss

    x, y = random_batch(2, batch=8, dim=4, classes=3)
    value, _ = xbm_loss("contrastive", x, y, xbm_init(16, 4, dtype=jnp.float64))
    np.testing.assert_allclose(value, contrastive_loss(x, y), rtol=1e-9)
    warm, _ = xbm_loss("contrastive", x, y, xbm_init(16, 4, dtype=jnp.float64), use_memory=False)
    np.testing.assert_allclose(warm, contrastive_loss(x, y), rtol=1e-9)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("name,kw", [LOSSES[0], LOSSES[2], LOSSES[3]])
def test_gradients_flow_only_into_the_batch(name, kw):
    (x0, y0), (x1, y1) = _batches(2, batch=4, dim=3, seed=5)
    state = xbm_init(6, 3, dtype=jnp.float64)
    _, state = xbm_loss(name, x0, y0, state, **kw)
    # the autodiff gradient treats the memory (including the batch's own fresh copies) as
    # constants: compare with finite differences of the numpy loss whose anchors move while
    # the memory keeps the copies of x1
    ref = NumpyXBM(6, 3)
    ref.enqueue(x0, y0)
    slots = ref.enqueue(x1, y1)
    expected = numerical_grad(lambda z: np_loss(name, ref, z, y1, slots, **kw), x1)
    grads = jax.jit(jax.grad(
        lambda z, m: xbm_loss(name, z, y1, state._replace(embeddings=m), **kw)[0], argnums=(0, 1)))
    got, g_mem = grads(x1, state.embeddings)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.abs(got).sum() > 0
    np.testing.assert_array_equal(np.asarray(g_mem), 0.0)  # stored items receive no gradient


# ----------------------------------------------------------------------------- jit, training use


def test_with_xbm_in_a_jitted_scan_equals_eager_loop():
    fn = with_xbm("triplet", margin=0.2)
    batches = _batches(3, batch=4, dim=3, seed=7)
    xs = np.stack([b[0] for b in batches])
    ys = np.stack([b[1] for b in batches])

    @jax.jit
    def run(state):
        def step(s, xy):
            value, s = fn(xy[0], xy[1], s)
            return s, value
        return jax.lax.scan(step, state, (xs, ys))

    state0 = xbm_init(10, 3, dtype=jnp.float64)
    final, values = run(state0)
    s = state0
    eager = []
    for x, y in batches:
        v, s = fn(x, y, s)
        eager.append(float(v))
    np.testing.assert_allclose(values, eager, rtol=1e-10)
    np.testing.assert_allclose(final.embeddings, s.embeddings)
    assert int(final.pointer) == 12 % 10


def test_vmap_over_independent_batches_and_memories():
    batches = _batches(2, batch=4, dim=3, seed=11)
    xs, ys = np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])
    states = jax.vmap(lambda _: xbm_init(6, 3, dtype=jnp.float64))(jnp.arange(2))
    _, states = jax.vmap(lambda x, y, s: xbm_loss("contrastive", x, y, s))(xs, ys, states)
    values, _ = jax.vmap(lambda x, y, s: xbm_loss("contrastive", x, y, s))(xs[::-1], ys[::-1], states)
    for b in range(2):
        s = xbm_init(6, 3, dtype=jnp.float64)
        _, s = contrastive_step(xs[b], ys[b], s)
        v, _ = contrastive_step(xs[1 - b], ys[1 - b], s)
        np.testing.assert_allclose(values[b], v, rtol=1e-10)


def test_bf16_memory_accumulates_in_float32():
    x, y = random_batch(0, batch=4, dim=3)
    state = xbm_init(8, 3, dtype=jnp.bfloat16)
    value, state = xbm_loss("contrastive", jnp.asarray(x, jnp.bfloat16), y, state)
    assert value.dtype == jnp.float32 and state.embeddings.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "triplet"])
def test_degenerate_batches_finite(name):
    @jax.jit
    def value_and_grad(x, y, state):
        return jax.value_and_grad(lambda z: xbm_loss(name, z, y, state), has_aux=True)(x)

    for case, (x, y) in degenerate_batches().items():
        state = xbm_init(8, x.shape[1], dtype=jnp.float64)
        # twice: empty memory, then a memory already holding the same degenerate items
        for _ in range(2):
            (value, state), g = value_and_grad(jnp.asarray(x), jnp.asarray(y), state)
            assert np.isfinite(value) and np.isfinite(g).all(), case


# ----------------------------------------------------------------------------- invariances


@settings(max_examples=5)
@given(st.integers(0, 10_000))
def test_batch_permutation_and_label_renaming_invariance(seed):
    rng = np.random.default_rng(seed)
    (x0, y0), (x1, y1) = _batches(2, batch=4, dim=3, seed=seed % 50)
    perm = rng.permutation(4)
    rename = rng.permutation(10) + 3
    fn = contrastive_step
    s = xbm_init(6, 3, dtype=jnp.float64)
    _, s = fn(x0, y0, s)
    v, _ = fn(x1, y1, s)
    s2 = xbm_init(6, 3, dtype=jnp.float64)
    _, s2 = fn(x0, rename[y0].astype(np.int32), s2)
    v2, _ = fn(x1[perm], rename[y1[perm]].astype(np.int32), s2)
    np.testing.assert_allclose(v, v2, rtol=1e-9)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_naming_the_argument():
    x, y = random_batch(0, batch=4, dim=3)
    state = xbm_init(6, 3)
    with pytest.raises(ValueError, match="^size"):
        xbm_init(0, 3)
    with pytest.raises(ValueError, match="^dtype"):
        xbm_init(4, 3, dtype=jnp.int32)
    with pytest.raises(ValueError, match="^embeddings"):
        xbm_enqueue(state, x[:, :2], y)
    with pytest.raises(ValueError, match="^embeddings"):
        xbm_enqueue(xbm_init(3, 3), x, y)
    with pytest.raises(ValueError, match="^labels"):
        xbm_enqueue(state, x, y.astype(float))
    with pytest.raises(ValueError, match="^mask"):
        xbm_enqueue(state, x, y, mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="^state"):
        xbm_loss("contrastive", x, y, (state.embeddings, state.labels))
    with pytest.raises(ValueError, match="^loss"):
        xbm_loss("proxy_anchor", x, y, state)
    with pytest.raises(ValueError, match="^metric"):
        xbm_loss("multi_similarity", x, y, state, metric="euclidean")
    with pytest.raises(ValueError, match="^neg_margin"):
        xbm_loss("contrastive", x, y, state, neg_margin=-1.0)
    with pytest.raises(ValueError, match="^margin"):
        xbm_loss("triplet", x, y, state, margin=-0.1)
    with pytest.raises(ValueError, match="^mining"):
        xbm_loss("triplet", x, y, state, mining="semi-hard")
    with pytest.raises(ValueError, match="^reduction"):
        with_xbm("contrastive", reduction="none")
    with pytest.raises(ValueError, match="^loss_kwargs"):
        xbm_loss("contrastive", x, y, state, margin=0.3)


# ----------------------------------------------------------------------------- PML parity


@pytest.mark.parametrize("name,kw", [LOSSES[0], LOSSES[2], ("triplet", {"margin": 0.2})])
def test_matches_pml_cross_batch_memory(name, kw):
    torch = pytest.importorskip("torch")
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    inner = {"contrastive": lambda: pml.ContrastiveLoss(),
             "multi_similarity": lambda: pml.MultiSimilarityLoss(),
             "triplet": lambda: pml.TripletMarginLoss(margin=0.2)}[name]()
    loss_fn = pml.CrossBatchMemory(inner, embedding_size=3, memory_size=7)
    state = xbm_init(7, 3, dtype=jnp.float64)
    for x, y in _batches(3):  # 4 + 4 + 4 unit-norm rows into 7 slots: wraps around
        ours, state = xbm_loss(name, x, y, state, **kw)
        theirs = loss_fn(torch.tensor(x), torch.tensor(y, dtype=torch.long))
        np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["circle", "supcon", "generalized_lifted_structured", "ranked_list"])
def test_any_pair_loss_runs_through_its_reference_form(name):
    """xbm_loss(name) == the public loss on (batch, memory) with the own copies removed."""
    from dmljax import losses

    x, y = random_batch(3, batch=6, dim=4, classes=3)
    state = xbm_enqueue(xbm_init(10, 4), *random_batch(4, batch=6, dim=4, classes=3))
    value, new_state = xbm_loss(name, x, y, state)
    fn = getattr(losses, f"{name}_loss")
    own = np.zeros((6, 10), bool)
    own[np.arange(6), (6 + np.arange(6)) % 10] = True  # the batch went to slots 6..11 mod 10
    want = fn(x, y, ref_embeddings=new_state.embeddings, ref_labels=new_state.labels,
              ref_valid=new_state.valid, pair_weights=~own)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-12)
    # the function itself works as the loss too
    value2, _ = xbm_loss(fn, x, y, state)
    np.testing.assert_allclose(float(value2), float(value), rtol=1e-12)
