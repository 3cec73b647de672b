"""Ranking metrics: where the positive lands among a query's references, and summaries of those ranks.

Small pure functions over plain arrays (as imagededup's ``information_retrieval.py``), behind one
:func:`evaluate` that returns ``{name: value}``. With exactly one positive per query, average precision equals the
reciprocal rank, so within a ranking set mAP is the MRR. :func:`retrieval_metrics` measures retrieval instead: every
image of a split queries all the others, and its positives are the others of its group (its label, or with a
``groupsFile`` the same object); it reports recall@k (a positive among the first k) and mAP.
"""
import numpy as np

__all__ = ["positive_rank", "top_k_accuracy", "mean_rank", "median_rank", "mean_reciprocal_rank", "evaluate",
           "rank_ranking_sets", "average_precision", "retrieval_metrics"]


def _ranks(ranks):
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 1:
        raise ValueError("ranks must be integers >= 1 (1 = the positive came first)")
    return ranks


def positive_rank(distances, is_positive):
    """1-based rank of the positive when the references are sorted by distance.

    Ties are counted pessimistically: a negative at exactly the positive's distance is ranked before it, so a
    ranker that gives every reference the same distance gets the worst rank, never a lucky first place.

    Parameters
    ----------
    distances : ndarray of shape (n_references,), float
        Lower is more similar.
    is_positive : ndarray of shape (n_references,), bool
        True for the positive(s); with several, the closest one counts.

    Returns
    -------
    int
        ``1 + number of negatives at a distance <= the positive's``.
    """
    distances = np.asarray(distances, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    if distances.shape != is_positive.shape or distances.ndim != 1:
        raise ValueError(f"distances {distances.shape} and is_positive {is_positive.shape} must be equal 1-D shapes")
    if not is_positive.any():
        raise ValueError("is_positive has no True entry: no positive to rank")
    if not np.isfinite(distances).all():
        raise ValueError("distances contain NaN or infinity")
    best_positive = distances[is_positive].min()
    return int(1 + np.count_nonzero(distances[~is_positive] <= best_positive))


def top_k_accuracy(ranks, k):
    """Fraction of queries, in [0, 1], whose positive is ranked k or better."""
    return float(np.mean(_ranks(ranks) <= k))


def mean_rank(ranks):
    """Mean 1-based rank of the positive (1 is perfect)."""
    return float(np.mean(_ranks(ranks)))


def median_rank(ranks):
    """Median 1-based rank of the positive (numpy's median: the mean of the middle two for an even count)."""
    return float(np.median(_ranks(ranks)))


def mean_reciprocal_rank(ranks):
    """Mean of 1 / rank, in (0, 1]; equal to mean average precision with one positive per query."""
    return float(np.mean(1.0 / _ranks(ranks)))


def evaluate(ranks, top_ns, metric="all"):
    """Summaries of positive ranks.

    Parameters
    ----------
    ranks : array-like of shape (n_queries,), int
        1-based ranks from :func:`positive_rank`.
    top_ns : iterable of int
        The k of each reported ``top<k>`` accuracy.
    metric : str
        ``'all'``, or one name among ``top<k>`` (k in ``top_ns``), ``mean_rank``, ``median_rank``, ``mrr``,
        ``n_queries``.

    Returns
    -------
    dict
        ``{'top1': fraction, ..., 'mean_rank', 'median_rank', 'mrr', 'n_queries'}`` (or only ``metric``).
    """
    ranks = _ranks(ranks)
    results = {f"top{k}": top_k_accuracy(ranks, k) for k in top_ns}
    results.update(mean_rank=mean_rank(ranks), median_rank=median_rank(ranks), mrr=mean_reciprocal_rank(ranks),
                   n_queries=int(ranks.size))
    if metric == "all":
        return results
    if metric not in results:
        raise ValueError(f"metric must be 'all' or one of {', '.join(results)}, got {metric!r}")
    return {metric: results[metric]}


def rank_ranking_sets(ranker, features, ranking_sets):
    """Rank of the positive for every ranking set.

    Parameters
    ----------
    ranker : object with ``distances(queries, references)``
    features : image_similarity.features.Features
        Must hold every query and reference key (``features.rows(keys)``).
    ranking_sets : list of image_similarity.splits.RankingSet

    Returns
    -------
    ndarray of shape (n_sets,), int64
    """
    ranks = np.empty(len(ranking_sets), dtype=np.int64)
    for i, ranking_set in enumerate(ranking_sets):
        distances = ranker.distances(features.rows([ranking_set.query]), features.rows(ranking_set.references))
        ranks[i] = positive_rank(distances[0], ranking_set.is_positive)
    return ranks


def average_precision(distances, is_positive):
    """Average precision of one query's ranking: the mean, over its positives, of the precision at each one's rank.

    Ties are counted pessimistically, as in :func:`positive_rank`: at equal distance the negatives come first, so
    the answer never depends on the order of the references.

    Parameters
    ----------
    distances : ndarray of shape (n_references,), float
        Lower is more similar.
    is_positive : ndarray of shape (n_references,), bool
        At least one True.

    Returns
    -------
    float
        In (0, 1]; 1 when every positive comes before every negative.
    """
    distances = np.asarray(distances, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=bool)
    positive_rank(distances, is_positive)  # the same checks of shapes, finiteness and at least one positive
    hits = is_positive[np.lexsort((is_positive, distances))]  # by distance; negatives before positives at a tie
    return float(np.mean(np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)))


def retrieval_metrics(ranker, features, keys, group_of, ks=(1, 5), batch_size=256):
    """Recall@k and mAP when every image of ``keys`` queries all the others and its positives share its group.

    Parameters
    ----------
    ranker : object with ``distances(queries, references)``
    features : image_similarity.features.Features
        Must hold every key.
    keys : list of str
        The images ranked, e.g. the test split; each one is a reference for every other.
    group_of : dict of str to hashable
        The group of each key (its label, or the groupsFile's id). A key without a group, or whose group has no
        other member among ``keys``, is only a reference, never a query.
    ks : iterable of int
        The k of each reported ``recall@k``: the fraction of queries with a positive among their first k.
    batch_size : int
        Queries per ``distances`` call.

    Returns
    -------
    dict
        ``{'recall@1': fraction, ..., 'map': mean average precision, 'n_queries': int}``; ``{}`` when no key
        has a positive.
    """
    keys = list(keys)
    groups = np.array([group_of.get(key) for key in keys], dtype=object)
    queries = [i for i, g in enumerate(groups) if g is not None and np.count_nonzero(groups == g) > 1]
    if not queries:
        return {}
    references = features.rows(keys)
    ranks, precisions = [], []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        distances = ranker.distances(references[batch], references)
        for row, i in zip(distances, batch):
            others = np.arange(len(keys)) != i
            is_positive = groups[others] == groups[i]
            ranks.append(positive_rank(row[others], is_positive))
            precisions.append(average_precision(row[others], is_positive))
    results = {f"recall@{k}": top_k_accuracy(ranks, k) for k in ks}
    results.update(map=float(np.mean(precisions)), n_queries=len(queries))
    return results
