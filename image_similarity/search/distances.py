"""Every distance between images, and the one top-k selection over them. Lower is always more similar.

Distances between embeddings (L1, L2 and cosine on L2-normalised rows), between class-probability vectors (L2,
cosine, and ``1 - p . q``, the probability of different labels), from a probability of a match (``1 - P``), and
cosine distances from the inner products of normalised vectors (what FAISS returns). The rankers
(:mod:`.rankers`), the index, the attributes, the SQL variant and the service all compute their distances here, and
pick their nearest ``k`` with :func:`top_k`.
"""
import numpy as np
from sklearn.metrics.pairwise import cosine_distances, euclidean_distances, manhattan_distances
from sklearn.preprocessing import normalize
from sklearn.utils.validation import check_array

__all__ = ["check_pair", "EMBEDDING_METRICS", "embedding_distances", "PROBABILITY_METRICS", "check_probability_metric",
           "probability_distances", "ProbabilityDistance", "label_then_appearance", "from_probability",
           "cosine_from_similarity", "k_reciprocal", "top_k"]

# Distances between L2-normalised embeddings.
EMBEDDING_METRICS = {"l1": manhattan_distances, "l2": euclidean_distances, "cosine": cosine_distances}
PROBABILITY_METRICS = ("l2", "cosine", "same_label")


def check_pair(queries, references):
    """Validate two matrices of equal width; returned as float64 (n_q, D), (n_r, D)."""
    queries = check_array(queries, dtype=np.float64, ensure_min_samples=0)
    references = check_array(references, dtype=np.float64, ensure_min_samples=0)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but references have {references.shape[1]}")
    return queries, references


def embedding_distances(queries, references, metric):
    """Distances between L2-normalised embeddings.

    Parameters
    ----------
    queries : ndarray of shape (n_q, D), float32
    references : ndarray of shape (n_r, D), float32
        Normalised here (rows of zeros stay zero).
    metric : {'l1', 'l2', 'cosine'}

    Returns
    -------
    ndarray of shape (n_q, n_r), float64
        Lower is more similar; cosine is ``1 - cos`` in [0, 2].
    """
    _check_metric(metric, EMBEDDING_METRICS)
    queries, references = check_pair(queries, references)
    return EMBEDDING_METRICS[metric](normalize(queries), normalize(references))


def _check_metric(metric, choices):
    if metric not in choices:
        raise ValueError(f"metric must be one of {', '.join(map(repr, choices))}, got {metric!r}")
    return metric


def check_probability_metric(metric):
    """Return ``metric`` if it is one of ``PROBABILITY_METRICS``; else raise ValueError naming the choices."""
    return _check_metric(metric, PROBABILITY_METRICS)


def probability_distances(p, q, metric):
    """Distances between class-probability vectors.

    Parameters
    ----------
    p : ndarray of shape (n_q, n_classes), float
    q : ndarray of shape (n_r, n_classes), float
        Rows sum to 1.
    metric : {'l2', 'cosine', 'same_label'}
        ``'same_label'`` is ``1 - p . q``: the probability that the two images have different labels when each one's
        label is drawn, independently, from its own vector. Unlike cosine it counts how sure the reference is: an
        unsure reference whose largest probability is the query's label is not as close as a sure one.

    Returns
    -------
    ndarray of shape (n_q, n_r), float64
        Lower is more similar; ``'same_label'`` and ``'cosine'`` lie in [0, 1], ``'l2'`` in [0, sqrt(2)].
    """
    check_probability_metric(metric)
    p, q = check_pair(p, q)
    if metric == "l2":
        return euclidean_distances(p, q)
    if metric == "cosine":
        return cosine_distances(p, q)
    return 1.0 - p @ q.T


class ProbabilityDistance:
    """A distance between stored class-probability vectors, with the ``distances`` interface of the rankers.

    Parameters
    ----------
    metric : {'l2', 'cosine', 'same_label'}
        See :func:`probability_distances`.
    """

    def __init__(self, metric):
        self.metric = check_probability_metric(metric)

    def distances(self, queries, references):
        """(n_q, n_r) float64 distances between score vectors (n_q, C) and (n_r, C); lower is more similar."""
        return probability_distances(queries, references, self.metric)


def label_then_appearance(p, q, queries, references, band):
    """The hybrid distance, lexicographic: label agreement in bands first, the embeddings' cosine within a band.

    The label term is how much less the two class-probability vectors agree than the query could at best,
    ``max(p) - p . q`` in [0, 1] (0 for a reference the classifier is sure has the query's most probable label), or
    how differently the classifier sees the two images, the total variation ``|p - q|_1 / 2``, if that is smaller.
    The second keeps the query itself, and the images the classifier cannot tell from it, in the first band: without
    it an image the classifier is unsure of ranks below every surer image of its label, even when it is the query.
    The term is cut into bands of width ``band``; a reference in a lower band always comes first, and within one
    band the cosine distance of the embeddings alone orders the references. So the classifier's small differences in
    confidence among the images of one label no longer decide their order: how they look does. The result is
    ``band * (index of the band + cosine / 2)``: it stays inside its band and reads as one number.

    Parameters
    ----------
    p : ndarray of shape (n_q, n_classes), float
    q : ndarray of shape (n_r, n_classes), float
        Class probabilities of the queries and references.
    queries : ndarray of shape (n_q, D), float32
    references : ndarray of shape (n_r, D), float32
        Their embeddings.
    band : float
        Width of a label band, in (0, 1]: the label-agreement difference that appearance may override. Small:
        close to ``'same_label'`` alone (ties broken by looks); 1: one band, the cosine alone.

    Returns
    -------
    ndarray of shape (n_q, n_r), float64
        Lower is more similar, in [0, band * ceil(1 / band)].
    """
    if not 0 < band <= 1:
        raise ValueError(f"the hybrid band width must be in (0, 1], got {band!r}")
    p, q = check_pair(p, q)
    shortfall = np.minimum(p.max(axis=1, keepdims=True) - p @ q.T, 0.5 * manhattan_distances(p, q))
    n_bands = int(np.ceil(1.0 / band - 1e-9))
    level = np.clip(np.floor(shortfall / band + 1e-9), 0, n_bands - 1)
    cosine = np.clip(embedding_distances(queries, references, "cosine"), 0.0, 2.0)
    return band * (level + cosine / 2.0)


def from_probability(probabilities):
    """The distance of a match probability: ``1 - P``, float64 in [0, 1], any shape."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64)


def cosine_from_similarity(similarities):
    """Cosine distances ``1 - s``, clipped to [0, 2], from inner products of L2-normalised vectors (same dtype)."""
    return np.clip(1.0 - similarities, 0.0, 2.0)


def k_reciprocal(distances, n_queries, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al. 2017, "Re-ranking Person Re-identification with k-reciprocal Encoding").

    Two images are close when each is among the other's nearest neighbours: every image is described by its
    expanded k1-reciprocal neighbours, weighted by ``exp(-distance)`` and averaged over its k2 nearest (local query
    expansion); the Jaccard distance of those descriptions is blended with the original distance. The arithmetic
    follows the authors' reference code.

    Parameters
    ----------
    distances : ndarray of shape (n, n), float
        Distances among the queries followed by the references (rows and columns in that order); lower is more
        similar. Shifted to start at 0 when some are negative (the weighted-L2 scores).
    n_queries : int
        The first ``n_queries`` rows are the queries.
    k1, k2 : int
        Reciprocal neighbours (k1 >= 1) and the neighbours averaged in the query expansion (1 = none).
    lambda_value : float
        Weight of the original distance in [0, 1] (1 gives back the original order).

    Returns
    -------
    ndarray of shape (n_queries, n - n_queries), float64
        Re-ranked distances of each query to each reference, lower is more similar.
    """
    original = np.asarray(distances, dtype=np.float64)
    if original.ndim != 2 or original.shape[0] != original.shape[1] or not 0 < n_queries < len(original):
        raise ValueError(f"need an (n, n) distance matrix over queries then references, got {original.shape} with "
                         f"{n_queries} queries")
    if int(k1) != k1 or k1 < 1 or int(k2) != k2 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise ValueError(f"k-reciprocal re-ranking needs k1, k2 >= 1 and lambda in [0, 1], got {k1}, {k2}, "
                         f"{lambda_value}")
    n, k1, k2 = len(original), int(k1), int(k2)
    original = (original - min(0.0, original.min())) ** 2
    original = (original / np.maximum(original.max(axis=0), 1e-12)).T  # each image's distances scaled to [0, 1]
    initial_rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        return forward[(initial_rank[forward, :k + 1] == i).any(axis=1)]

    descriptions = np.zeros((n, n))
    for i in range(n):
        neighbours = reciprocal(i, k1)
        expansion = [neighbours]
        for candidate in neighbours:
            theirs = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(theirs, neighbours)) > 2 / 3 * len(theirs):
                expansion.append(theirs)
        expanded = np.unique(np.concatenate(expansion))
        weight = np.exp(-original[i, expanded])
        descriptions[i, expanded] = weight / weight.sum()
    if k2 > 1:
        descriptions = descriptions[initial_rank[:, :k2]].mean(axis=1)
    jaccard = np.empty((n_queries, n))
    for i in range(n_queries):
        shared = np.minimum(descriptions[i], descriptions).sum(axis=1)
        jaccard[i] = 1 - shared / (2 - shared)
    final = (1 - lambda_value) * jaccard + lambda_value * original[:n_queries]
    return final[:, n_queries:]


def top_k(distances, k):
    """Positions of the ``k`` smallest distances of each row, nearest first; ties keep the lower position first.

    The same as ``np.argsort(distances, axis=-1, kind="stable")[..., :k]``, without sorting every row in full.

    Parameters
    ----------
    distances : ndarray of shape (n,) or (n_q, n)
    k : int
        At least 1; capped at ``n``.

    Returns
    -------
    ndarray of shape (min(k, n),) or (n_q, min(k, n)), int64
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    values = np.asarray(distances)
    rows = np.atleast_2d(values)
    k = min(int(k), rows.shape[1])
    if k < rows.shape[1]:
        top = np.argpartition(rows, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(rows, top, axis=1).max(axis=1, keepdims=True)
        tied = (rows <= kth).sum(axis=1) > k  # which of the tied ones argpartition kept is arbitrary: sort those
        top[tied] = np.argsort(rows[tied], axis=1, kind="stable")[:, :k]
    else:
        top = np.broadcast_to(np.arange(rows.shape[1]), rows.shape).copy()
    order = np.lexsort((top, np.take_along_axis(rows, top, axis=1)), axis=1)
    top = np.take_along_axis(top, order, axis=1).astype(np.int64)
    return top[0] if values.ndim == 1 else top
