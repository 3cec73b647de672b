"""A 2-D map of a collection's embeddings, where clusters, outliers, label issues and near-duplicates show at a glance.

:func:`project_2d` places each embedding in the plane (UMAP on cosine distances when umap-learn is installed, else
scikit-learn's t-SNE); :func:`build_map` joins the points with what is known about them (labels, the label-issue
suspects of A6, the near-duplicate groups of step 1); :func:`save_map` writes it as JSON for the web page's map view
and :func:`.plots.plot_embedding_map` draws it.
"""
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.fileio import load_json, save_json
from ..data.splits import label_of
from .label_issues import load_label_issues

__all__ = ["METHODS", "EmbeddingMap", "project_2d", "build_map", "save_map", "load_map", "read_flagged_keys"]

logger = logging.getLogger(__name__)

METHODS = ("auto", "umap", "tsne")
MAP_FORMAT = "image_similarity.embedding_map/1"


def _resolve_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("method 'umap' needs umap-learn (pip install umap-learn), or use 'tsne'")
    return method


def project_2d(matrix, method="auto", random_state=0):
    """Place embeddings in the plane so that near ones stay near.

    Parameters
    ----------
    matrix : ndarray of shape (n, D), float32
        Embeddings (any scale: distances are cosine).
    method : {'auto', 'umap', 'tsne'}
        'auto': UMAP when umap-learn is installed, else t-SNE.
    random_state : int
        Seeds the layout: the same input gives the same map.

    Returns
    -------
    coords : ndarray of shape (n, 2), float32
        Scaled to [0, 1] on each axis.
    method : str
        The method used.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    n = len(matrix)
    if n < 3:
        raise ValueError(f"a map needs at least 3 embeddings, got {n}")
    method = _resolve_method(method)
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=random_state, n_jobs=1)
        coords = reducer.fit_transform(matrix)
    else:
        from sklearn.manifold import TSNE

        coords = TSNE(perplexity=min(30.0, (n - 1) / 3), metric="cosine", init="pca",
                      random_state=random_state).fit_transform(matrix)
    coords = np.asarray(coords, dtype=np.float64)
    span = np.ptp(coords, axis=0)
    coords = (coords - coords.min(axis=0)) / np.where(span > 0, span, 1.0)
    return coords.astype(np.float32), method


@dataclass
class EmbeddingMap:
    """Points of a map, row ``i`` for ``keys[i]`` (the features' rows, so ids match the web service's).

    Attributes
    ----------
    keys : list of str
    coords : ndarray of shape (n, 2), float32 in [0, 1]
    labels : list of str
        ``splits.label_of(key)``, or '' for keys without a folder.
    suspects : list of bool
        A6 flagged the image's label as a likely issue.
    duplicate_pairs : list of (int, int)
        Rows of images in one near-duplicate group (each joined to its group's first).
    method : str
    """

    keys: list
    coords: np.ndarray
    labels: list
    suspects: list
    duplicate_pairs: list = field(default_factory=list)
    method: str = ""


def build_map(keys, matrix, method="auto", flagged=(), duplicate_groups=(), random_state=0):
    """The map of stored features.

    Parameters
    ----------
    keys : list of str
    matrix : ndarray of shape (n, D), float32
    method : {'auto', 'umap', 'tsne'}
    flagged : iterable of str
        Keys A6 flagged as label issues (:func:`read_flagged_keys`).
    duplicate_groups : iterable of list of str
        Near-duplicate groups (:func:`.label_issues.read_near_duplicate_groups`); keys that are not in ``keys`` are left out.
    random_state : int

    Returns
    -------
    EmbeddingMap
    """
    coords, used = project_2d(matrix, method, random_state)
    row = {key: i for i, key in enumerate(keys)}
    flagged = set(flagged)
    pairs = []
    for group in duplicate_groups:
        rows = [row[key] for key in group if key in row]
        pairs += [(rows[0], other) for other in rows[1:]]
    labels = [label_of(key) if "/" in key else "" for key in keys]
    return EmbeddingMap(list(keys), coords, labels, [key in flagged for key in keys], pairs, used)


def save_map(path, emap):
    """Write ``emap`` as JSON (atomically): ``{"format", "method", "points": [{id, key, label, x, y, suspect}],
    "duplicate_pairs": [[id, id], ...]}``."""
    points = [{"id": i, "key": key, "label": label, "x": round(float(x), 5), "y": round(float(y), 5),
               "suspect": suspect}
              for i, (key, label, (x, y), suspect) in enumerate(zip(emap.keys, emap.labels, emap.coords,
                                                                    emap.suspects))]
    return save_json(path, {"format": MAP_FORMAT, "method": emap.method, "points": points,
                            "duplicate_pairs": [list(p) for p in emap.duplicate_pairs]})


def load_map(path):
    """The document :func:`save_map` wrote, checked to be one; ValueError naming the file otherwise."""
    try:
        document = load_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable embedding map ({err})") from None
    if not isinstance(document, dict) or document.get("format") != MAP_FORMAT:
        raise ValueError(f"{path}: not an embedding map of format {MAP_FORMAT!r}: run A7_embeddingMap.py again")
    return document


def read_flagged_keys(path):
    """Keys that A6's label_issues.csv flags (``flagged == 'yes'``); empty when the file is absent."""
    if not Path(path).is_file():
        return set()
    return {row["key"] for row in load_label_issues(path) if row.get("flagged") == "yes"}
