"""Evaluation of a train state on a data source's unseen classes: one path for every source.

`evaluate(state, source)` embeds the source's evaluation set (every query against the other
queries, or against a separate gallery), computes `dmljax.metrics.report.evaluate`'s retrieval
metrics (cosine kNN; Recall@K at the source's ks, MAP@R, R-precision, MRR; NMI / AMI / F1 of
one k-means restart with ``with_nmi``) and, for Omniglot, the error on the 20 official 20-way
one-shot runs. `make_embed_fn` adds test-time views (`dmljax.train.tta`), `make_eval_state_fn`
the weight average and PreciseBN statistics, `rerank_metrics` the similarity-network
re-ranking, `prefix_metrics` the metrics of each Matryoshka prefix of the embedding; `format_results` prints the table with `dmljax.metrics.format_metrics_table`.
"""

from __future__ import annotations

import re
import sys

import jax
import numpy as np

from dmljax._validation import check_choice
from dmljax.data.sources import DataSource
from dmljax.metrics.report import evaluate as evaluate_embeddings, format_metrics_table
from dmljax.train.step import embed

__all__ = ["TABLE_METRICS", "clustering", "evaluate", "format_results", "make_embed_fn", "make_eval_state_fn", "prefix_metrics",
           "rerank_metrics"]

_COUNTS = ("num_queries", "num_gallery", "knn_k", "knn_seconds")


def evaluate(state, source: DataSource, *, with_nmi: bool = False, batch_size: int = 1024,
             key: jax.Array | None = None, embed_fn=None, keep: dict | None = None) -> dict[str, float]:
    """Embed ``source.eval_set`` with ``state`` (eval mode) and compute the DML metrics.

    Args:
      state: a `dmljax.train.state.TrainState`.
      source: a `dmljax.data.sources.DataSource`.
      with_nmi: add NMI / AMI / F1 (one k-means restart, key ``key`` or ``jax.random.key(0)``);
        a k-means failure is reported on stderr and the retrieval metrics are kept.
      batch_size: embedding chunk (``eval.batch_size``).
      embed_fn: ``embed_fn(state, images, batch_size) -> [N, D]`` in place of
        `dmljax.train.step.embed` (e.g. `make_embed_fn`'s test-time-augmented embedding).
      keep: a dict that receives ``step``, ``metrics``, the query ``embeddings`` and the
        ``gallery_embeddings`` (None without a gallery), so the final table can reuse the
        evaluation the loop already ran at the last step.

    Returns:
      dict[str, float]: ``recall@k`` (the source's ks), ``precision_at_1``, ``r_precision``,
      ``map_at_r``, ``mrr`` (no nDCG), [``nmi``, ``ami``, ``f1``], [``one_shot_error``].
    """
    if embed_fn is None:
        embed_fn = lambda s, x, b: embed(s, x, batch_size=b)  # noqa: E731
    e = source.eval_set
    query = embed_fn(state, e.query_images, batch_size)
    gallery = None if e.gallery_images is None else embed_fn(state, e.gallery_images, batch_size)
    try:
        out = evaluate_embeddings(query, e.query_labels, gallery, e.gallery_labels, ks=e.ks, metric="cosine",
                                  clustering=with_nmi, kmeans_restarts=1, key=key)
    except Exception as err:  # NMI is a bonus; never lose a finished run over k-means
        if not with_nmi:
            raise
        print(f"clustering metrics failed: {err}", file=sys.stderr)
        out = evaluate_embeddings(query, e.query_labels, gallery, e.gallery_labels, ks=e.ks, metric="cosine",
                                  clustering=False)
    out = {k: float(v) for k, v in out.items() if not k.startswith("ndcg") and k not in _COUNTS}
    if source.one_shot_runs is not None:
        from dmljax.data.omniglot import one_shot_error
        error, _ = one_shot_error(lambda x: embed_fn(state, x, 64), source.one_shot_runs)
        out["one_shot_error"] = float(error)
    if keep is not None:
        keep.update(step=int(state.step), metrics=dict(out), embeddings=query, gallery_embeddings=gallery)
    return out


TABLE_METRICS = ("map_at_r", "r_precision", "nmi", "one_shot_error")


def format_results(metrics: dict[str, float]) -> str:
    """The final table (`dmljax.metrics.format_metrics_table`, values as fractions): Recall@K,
    MAP@R, R-precision, NMI, one-shot error, then any re-ranking metrics."""
    names = [k for k in metrics if k.startswith("recall@") and "rerank" not in k]
    names += [k for k in TABLE_METRICS if k in metrics]
    names += [k for k in metrics if _PREFIX_KEY.match(k)]
    names += [k for k in metrics if "rerank" in k and k not in names and np.ndim(metrics[k]) == 0]
    return format_metrics_table({n: metrics[n] for n in names}, percent=False)


_PREFIX_KEY = re.compile(r"^d[0-9]+/")
PREFIX_METRICS = ("recall@", "map_at_r", "r_precision")


def prefix_metrics(source: DataSource, query_embeddings, gallery_embeddings=None, *, dims) -> dict[str, float]:
    """Retrieval metrics of each prefix ``[:, :m]`` (L2-normalised) of the evaluation embeddings
    (`dmljax.losses.matryoshka.evaluate_prefixes`, cosine kNN at the source's ks, as `evaluate`):
    ``{"d<m>/recall@<k>", "d<m>/map_at_r", "d<m>/r_precision"}`` for every m of ``dims`` (the
    Matryoshka table: how well the first m coordinates retrieve alone).

    Args:
      source: the `DataSource` the embeddings come from (labels, ks).
      query_embeddings: [N, D] (``keep["embeddings"]`` of `evaluate`); gallery_embeddings:
        [M, D] or None (every query against the other queries).
      dims: prefix dimensions, distinct ints in [1, D].
    """
    from dmljax.losses.matryoshka import evaluate_prefixes
    e = source.eval_set
    per_dim = evaluate_prefixes(np.asarray(query_embeddings), e.query_labels,
                                None if gallery_embeddings is None else np.asarray(gallery_embeddings),
                                e.gallery_labels, dims=tuple(dims), ks=e.ks, metric="cosine", clustering=False)
    return {f"d{m}/{k}": float(v) for m, out in per_dim.items() for prefix in PREFIX_METRICS
            for k, v in out.items() if k.startswith(prefix)}


def make_eval_state_fn(config, train_images, *, key, average=None):
    """``state -> state`` applied before every evaluation: the weight average (``average``, e.g.
    EMA) if any, then, with ``eval.precise_bn_batches > 0``, PreciseBN
    (`dmljax.train.precise_bn.precise_batch_norm`): the BatchNorm statistics recomputed on that
    many batches of ``eval.precise_bn_batch_size`` training images as stored, i.e. without the
    training augmentation (leave it 0 where the stored images are not what the model is evaluated
    on, e.g. crops of larger stored images). The result for the most recent state object is kept,
    so the final table, re-ranking and the averaged checkpoint reuse the last evaluation's state
    instead of recomputing the statistics."""
    e = config.eval
    batches = int(e.precise_bn_batches)
    if batches < 0:
        raise ValueError(f"eval.precise_bn_batches must be >= 0, got {batches}")
    batch_size = min(int(e.precise_bn_batch_size), len(train_images)) if batches else 0

    last = [None, None]  # (state, result): main() asks again for the state fit() evaluated last

    def for_eval(state):
        if state is last[0]:
            return last[1]
        result = state if average is None else average(state)
        if batches:
            from dmljax.train.precise_bn import precise_batch_norm
            result = precise_batch_norm(result, train_images, key=key, num_batches=batches, batch_size=batch_size)
        last[:] = [state, result]
        return result

    return for_eval


def make_embed_fn(config, *, final: bool = False):
    """``embed_fn(state, images, batch_size) -> [N, D]``: plain, or test-time augmented
    (`dmljax.train.tta.embed_tta`) when ``config.eval`` asks for more than the identity view.

    ``final=True``: the views of the last evaluation, ``eval.final_tta_shifts`` when set (a
    non-empty tuple; e.g. a wider grid that is too slow to run at every evaluation), else
    ``eval.tta_shifts``."""
    e = config.eval
    shifts = tuple(tuple(s) for s in e.tta_shifts)
    if final and tuple(e.final_tta_shifts):
        shifts = tuple(tuple(s) for s in e.final_tta_shifts)
    zooms = tuple(e.tta_zooms)
    feature_weight = float(e.feature_weight)
    if set(shifts) <= {(0, 0)} and set(zooms) <= {1.0} and not feature_weight:
        return lambda state, images, batch_size: embed(state, images, batch_size=batch_size)
    from dmljax.train.tta import embed_tta
    return lambda state, images, batch_size: embed_tta(state, images, shifts=shifts, zooms=zooms,
                                                       feature_weight=feature_weight, batch_size=batch_size)


def rerank_metrics(config, state, *, train_images, train_labels, test_embeddings, test_labels, embed_fn):
    """``eval.rerank="similarity"``: `dmljax.train.rerank.rerank_report` on the training and test
    embeddings (the training set is embedded here with ``embed_fn``); {} when ``eval.rerank`` is ""."""
    mode = config.eval.rerank
    if not mode:
        return {}
    check_choice(mode, name="eval.rerank", choices=("similarity",))
    from dmljax.train.rerank import rerank_report
    train_emb = embed_fn(state, train_images, int(config.eval.batch_size))
    report = rerank_report(train_embeddings=np.asarray(train_emb), train_labels=np.asarray(train_labels, np.int32),
                           test_embeddings=np.asarray(test_embeddings), test_labels=np.asarray(test_labels, np.int32),
                           key=jax.random.fold_in(jax.random.key(config.seed), 0x5E7A), config=config)
    return {k: float(v) for k, v in report.items()}


def clustering(embeddings, labels) -> dict[str, float]:
    """NMI / AMI / F1 of one k-means restart (key ``jax.random.key(0)``) on unit embeddings, as
    `evaluate` computes them; {} (and a note on stderr) if k-means fails."""
    from dmljax.metrics.clustering import clustering_metrics
    try:
        cm = clustering_metrics(embeddings, labels, key=jax.random.key(0), num_restarts=1)
        return {k: float(v) for k, v in cm.items() if np.ndim(v) == 0}
    except Exception as err:  # NMI is a bonus; never lose the run over it
        print(f"clustering metrics failed: {err}", file=sys.stderr)
        return {}
