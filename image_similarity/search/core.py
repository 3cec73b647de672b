"""The one search: a gallery of stored embeddings, a ranker, queries in, the ``k`` nearest out.

Every door (A1, the web service, the similarity model, the SQL variant, step 5's per-query lists and combined
attributes) ends in :func:`search` over a :class:`Gallery`, with a ranker of :mod:`.rankers` (chosen by name with
:func:`resolve_ranker`) as the interchangeable part. A ranker that can be answered by a cosine index (it has
``index_vectors``: plain cosine, cosine joined with colour) is searched with :class:`.index.NearestNeighborIndex`,
built once per gallery and ranker kind; any other ranker computes its ``distances`` block by block and keeps the
nearest with :func:`.distances.top_k` (stable: at equal distance the lower gallery row comes first).
"""
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..data.features import Features
from .colour import colour_histograms, gallery_histograms
from .distances import top_k
from .rankers import ranker_names

__all__ = ["Gallery", "Results", "search", "search_keys", "resolve_ranker", "colour_cache_path", "run_gallery",
           "embed_query", "BLOCK_BYTES"]

logger = logging.getLogger(__name__)

BLOCK_BYTES = 256 * 2**20  # the distances of a block of queries against a block of the gallery take about this much


@dataclass
class Gallery:
    """The searched images: their keys, their embeddings and what rankers may need besides.

    Attributes
    ----------
    keys : list of str
        One per row, e.g. the path relative to the image folder ("label/file.jpg").
    matrix : ndarray of shape (n, D), float32
        The embeddings (memory-mapped or in memory), row ``i`` for ``keys[i]``; or other stored vectors a ranker
        compares (the SQL variant's float64 class probabilities).
    model_id : str or None
        The network that made them (``backbones.model_id``).
    labels : list or None
        One label per row, when known.
    colours : ndarray of shape (n, colour.COLOUR_DIM), float32, or None
        Colour histograms, for rankers with ``uses_colour``; computed by ``colour_source`` on first need.
    colour_source : callable () -> ndarray, optional
        Computes ``colours`` (e.g. ``colour.gallery_histograms`` from the image files, cached beside the features).
    """

    keys: list
    matrix: np.ndarray
    model_id: Optional[str] = None
    labels: Optional[list] = None
    colours: Optional[np.ndarray] = None
    colour_source: Optional[Callable[[], np.ndarray]] = None
    _indexes: dict = field(default_factory=dict, repr=False)
    _inputs: dict = field(default_factory=dict, repr=False)
    _rows: Optional[dict] = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        self.keys = list(self.keys)
        if self.matrix.ndim != 2 or len(self.matrix) != len(self.keys):
            raise ValueError(f"a gallery needs one (D,) row per key: {len(self.keys)} keys, matrix "
                             f"{self.matrix.shape}")

    @classmethod
    def from_features(cls, features, colour_source=None):
        """The gallery of a ``features.Features`` store (its ``meta['model_id']``)."""
        return cls(features.keys, features.matrix, features.meta.get("model_id"), colour_source=colour_source)

    def __len__(self):
        return len(self.keys)

    @property
    def row_of(self):
        """``{key: row}``."""
        if self._rows is None:
            self._rows = {key: i for i, key in enumerate(self.keys)}
        return self._rows

    def rows(self, keys):
        """The gallery rows of ``keys``, (len(keys),) int64; KeyError naming the missing ones."""
        missing = [k for k in keys if k not in self.row_of]
        if missing:
            raise KeyError(f"not in the gallery: {len(missing)} key(s), e.g. {missing[:3]}")
        return np.array([self.row_of[k] for k in keys], dtype=np.int64)

    def colour_histograms(self):
        """``colours``, computed by ``colour_source`` the first time (thread-safe)."""
        with self._lock:
            if self.colours is None:
                if self.colour_source is None:
                    raise ValueError("this ranker needs the colour histograms of the gallery, and this gallery has "
                                     "none (no image folder to compute them from)")
                self.colours = np.asarray(self.colour_source(), dtype=np.float32)
                if self.colours.shape[0] != len(self.keys):
                    raise ValueError(f"{self.colours.shape[0]} colour histograms for {len(self.keys)} images")
            return self.colours

    def inputs(self, scorer, rows=None):
        """The rows a scorer ranks: the embeddings, joined with the colour histograms when it ``uses_colour``.

        All rows (``rows`` None) are one array object, made once: a ranker may remember what it computed about it
        (``ClassProbRanker.reference_proba``).
        """
        joined = bool(getattr(scorer, "uses_colour", False))
        with self._lock:
            if rows is None and joined in self._inputs:
                return self._inputs[joined]
            matrix = np.asarray(self.matrix if rows is None else self.matrix[rows])  # its dtype: scores are float64
            if joined:
                colours = self.colour_histograms()
                matrix = np.hstack([matrix, colours if rows is None else colours[rows]])
            if rows is None:
                self._inputs[joined] = matrix
            return matrix

    def features_for(self, scorer):
        """The rows ``scorer`` ranks (:meth:`inputs`) as a ``features.Features`` store, for the evaluation."""
        return Features(self.keys, self.inputs(scorer), {"model_id": self.model_id}, self.row_of)

    def subset(self, keys):
        """A gallery of these keys only, in this order (colours included when computed or computable)."""
        rows = self.rows(keys)
        source = None if self.colours is None and self.colour_source is None else \
            lambda: self.colour_histograms()[rows]
        return Gallery(list(keys), np.asarray(self.matrix[rows]), self.model_id,
                       None if self.labels is None else [self.labels[i] for i in rows], colour_source=source)

    def append(self, keys, matrix, labels=None, colours=None):
        """Add rows (the indexes built so far grow with them)."""
        self.keys.extend(keys)
        self.matrix = np.concatenate([self.matrix, np.asarray(matrix, dtype=self.matrix.dtype)])
        if labels is not None:
            self.labels = (self.labels or []) + list(labels)
        if colours is not None:
            self.colours = np.concatenate([self.colours, colours]) if self.colours is not None else colours
        for scorer, index in self._indexes.values():
            joined = getattr(scorer, "uses_colour", False)
            index.add(scorer.index_vectors(np.hstack([matrix, colours]) if joined else matrix))
        self._rows = None
        self._inputs.clear()

    def index(self, scorer, build=None):
        """The cosine index of ``scorer.index_vectors(self.inputs(scorer))``, built once per kind of scorer.

        ``build``: a callable taking the vectors and returning a built ``NearestNeighborIndex`` (default: exact
        below its ANN threshold, approximate above).
        """
        with self._lock:
            if _kind(scorer) not in self._indexes:
                from .index import NearestNeighborIndex  # here: FAISS only for the searches that use it

                vectors = scorer.index_vectors(self.inputs(scorer))
                self.set_index(scorer, (build or NearestNeighborIndex().build)(vectors))
            return self._indexes[_kind(scorer)][1]

    def set_index(self, scorer, index):
        """Use an already built index (e.g. one read from disk) for ``scorer``'s kind."""
        self._indexes[_kind(scorer)] = (scorer, index)


def _kind(scorer):
    """Scorers of one kind share an index: the same class and settings give the same index vectors."""
    return type(scorer), repr(sorted(vars(scorer).items()))


@dataclass
class Results:
    """What :func:`search` found, nearest first.

    Attributes
    ----------
    indices : ndarray of shape (n_q, k), int64
        Gallery rows; ``-1`` in slots left empty (fewer than ``k`` references, or outside ``radius``).
    distances : ndarray of shape (n_q, k), float64
        Lower is more similar; ``inf`` in empty slots.
    keys : list of str
        The gallery's keys, for :meth:`matches`.
    """

    indices: np.ndarray
    distances: np.ndarray
    keys: list

    def __len__(self):
        return len(self.indices)

    def matches(self, i):
        """``[(key, distance), ...]`` of query ``i``, nearest first, empty slots left out."""
        return [(self.keys[j], float(d)) for j, d in zip(self.indices[i], self.distances[i]) if j >= 0]

    def rows(self):
        """``(query position, rank from 1, gallery row, key, distance)`` of every match, query by query."""
        for i in range(len(self.indices)):
            rank = 0
            for j, d in zip(self.indices[i], self.distances[i]):
                if j >= 0:
                    rank += 1
                    yield i, rank, int(j), self.keys[j], float(d)


def _inputs(scorer, queries, colours):
    queries = np.asarray(queries)
    if not getattr(scorer, "uses_colour", False):
        return queries
    if colours is None:
        raise ValueError("this ranker needs the colour histograms of the queries")
    return np.hstack([queries, np.asarray(colours, dtype=np.float32)])


def search(gallery, scorer, queries, k, colours=None, exclude=None, radius=None, block_bytes=BLOCK_BYTES):
    """The ``k`` gallery rows nearest to each query under ``scorer``.

    Parameters
    ----------
    gallery : Gallery
    scorer : ranker
        Anything with ``distances(queries, references)`` (n_q, n_r), lower is more similar; with
        ``index_vectors`` it is searched by a cosine index; with ``uses_colour`` its inputs are joined with colour
        histograms.
    queries : ndarray of shape (n_q, D), float32
        Query embeddings (from the gallery's network).
    k : int
        Matches per query, >= 1 (at most the gallery's size, less one with ``exclude``).
    colours : ndarray of shape (n_q, colour.COLOUR_DIM), float32, optional
        The queries' colour histograms; needed when the scorer ``uses_colour``.
    exclude : ndarray of shape (n_q,), int, optional
        A gallery row to leave out of each query's matches (the query itself); ``-1`` for none.
    radius : float, optional
        Largest distance kept; farther matches leave empty slots.
    block_bytes : int
        Memory for the distances of one block of queries against one block of the gallery (brute force).

    Returns
    -------
    Results
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    inputs = _inputs(scorer, queries, colours)
    exclude = np.full(len(inputs), -1, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    extra = int((exclude >= 0).any())  # one more found, as the excluded row may be among them
    k = min(int(k), len(gallery) - extra)
    if k < 1 or not len(inputs):
        return Results(np.empty((len(inputs), 0), np.int64), np.empty((len(inputs), 0)), gallery.keys)
    if hasattr(scorer, "index_vectors"):
        found, indices = gallery.index(scorer).search(scorer.index_vectors(inputs), k + extra)
        distances = found.astype(np.float64)
    else:
        distances, indices = _brute_force(gallery, scorer, inputs, k + extra, block_bytes)
    if extra:
        distances, indices = _drop(distances, indices, exclude, k)
    if radius is not None:
        far = distances > radius
        distances[far], indices[far] = np.inf, -1
    return Results(indices, distances, gallery.keys)


def _brute_force(gallery, scorer, inputs, k, block_bytes):
    """``scorer.distances`` block by block, the nearest ``k`` kept with :func:`top_k`: (distances, indices)."""
    n = len(gallery)
    whole = getattr(scorer, "needs_whole_gallery", False) or n * 8 <= block_bytes
    references = gallery.inputs(scorer) if whole else None
    step = n if whole else max(1, block_bytes // (8 * max(1, min(len(inputs), 1024))))
    query_step = max(1, block_bytes // (8 * min(n, step)))
    best_d = np.full((len(inputs), k), np.inf)
    best_i = np.full((len(inputs), k), -1, np.int64)
    for q in range(0, len(inputs), query_step):
        block_d, block_i = best_d[q:q + query_step], best_i[q:q + query_step]
        for start in range(0, n, step):
            refs = references if whole else gallery.inputs(scorer, slice(start, start + step))
            d = np.asarray(scorer.distances(inputs[q:q + query_step], refs), dtype=np.float64)
            top = top_k(d, k)
            # The best so far come first: at equal distance the lower gallery row stays first.
            cand_d = np.concatenate([block_d, np.take_along_axis(d, top, axis=1)], axis=1)
            cand_i = np.concatenate([block_i, top + start], axis=1)
            cand_d[cand_i < 0] = np.inf
            keep = top_k(cand_d, k)
            block_d[:], block_i[:] = np.take_along_axis(cand_d, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    return best_d, best_i


def _drop(distances, indices, exclude, k):
    """Each row's matches without its excluded gallery row, the first ``k`` kept."""
    keep = indices != exclude[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept slots first, in their order
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(indices, order, axis=1)


def search_keys(gallery, scorer, keys, k, radius=None):
    """:func:`search` for images of the gallery itself, each one left out of its own matches.

    Parameters
    ----------
    keys : list of str
        Gallery keys; their stored embeddings (and colours) are the queries.

    Returns
    -------
    Results
    """
    rows = gallery.rows(keys)
    colours = gallery.colour_histograms()[rows] if getattr(scorer, "uses_colour", False) else None
    return search(gallery, scorer, np.asarray(gallery.matrix[rows]), k, colours, exclude=rows, radius=radius)


def resolve_ranker(name, available):
    """The ranker called ``name`` among ``available`` (the one place a ranker name is checked).

    Parameters
    ----------
    name : str
    available : dict of str to ranker
        What this run offers (``rankers.build_rankers``).

    Raises
    ------
    ValueError
        One line: for an unknown name, listing the registered ones; for a known one this run lacks (step 4's
        learned rankers before 4_trainSvm.py ran), listing the available ones.
    """
    if name in available:
        return available[name]
    if name not in ranker_names():
        raise ValueError(f"unknown ranker {name!r}: choose from {', '.join(ranker_names())}")
    raise ValueError(f"ranker {name!r} needs step 4's svm and classifier payloads (run 4_trainSvm.py first); "
                     f"available now: {', '.join(available)}")


def colour_cache_path(features_path):
    """Where the colour histograms of stored features are cached: ``<features stem>.colours.npy`` beside them."""
    features_path = Path(features_path)
    return features_path.with_name(features_path.stem + ".colours.npy")


def run_gallery(features, features_path, image_dir, embedder):
    """The gallery of a pipeline run: its stored features, colours computed from ``image_dir`` when a ranker needs
    them (cached beside the features, :func:`.colour.gallery_histograms`).

    Parameters
    ----------
    features : features.Features
    features_path : Path
        Where they are stored.
    image_dir : Path or None
        The folder their keys are relative to; None: no colours.
    embedder : callable () -> embedder.Embedder
        Gives the network whose input pixels the histograms are computed on (called only then).
    """
    def colours():
        return gallery_histograms(colour_cache_path(features_path), features.keys, image_dir,
                                  embedder().transform.to_uint8, features.meta["model_id"])

    return Gallery.from_features(features, colour_source=None if image_dir is None else colours)


def embed_query(embedder, image):
    """The embedding and colour histogram of one decoded image, as every door computes them.

    Parameters
    ----------
    embedder : embedder.Embedder
    image : PIL.Image.Image
        RGB (``images.read_image``).

    Returns
    -------
    vector : ndarray of shape (1, D), float32
    colours : ndarray of shape (1, colour.COLOUR_DIM), float32
    """
    pixels = embedder.transform.to_uint8(image).unsqueeze(0)
    return embedder.forward_batch(embedder.transform.normalize(pixels)), colour_histograms(pixels.numpy())
