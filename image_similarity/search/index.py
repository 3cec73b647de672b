"""Nearest-neighbour search over L2-normalised features, exact or approximate (FAISS).

Every vector is L2-normalised when it enters the index, so the inner product is the cosine similarity. Results are
returned as **cosine distances** ``1 - cos`` in ``[0, 2]``, float32, lower is more similar (the ``CosineRanker``
convention), with int64 row numbers: the position of the vector in the order it was given to :meth:`build` and
:meth:`NearestNeighborIndex.add`.

Three kinds of index:

- ``'exact'``: every reference is compared (FAISS ``IndexFlatIP`` holds the vectors). The comparison itself is done
  by numpy (a BLAS matrix product per query batch and reference chunk, then ``argpartition``) or by FAISS's own flat
  search, see :data:`EXACT_BACKEND`.
- ``'ivf'``: FAISS ``IndexIVFFlat`` with inner product; ``nlist`` ~ 4 sqrt(N) k-means lists trained on a sample,
  ``nprobe`` lists scanned per query. :meth:`NearestNeighborIndex.calibrate_recall` raises ``nprobe`` until the
  measured recall reaches a target.
- ``'hnsw'``: FAISS ``IndexHNSWFlat`` with inner product; ``efSearch`` plays the part of ``nprobe``.

``kind='auto'`` builds ``'exact'`` below :data:`ANN_THRESHOLD` vectors and ``'ivf'`` from there on.

Measure on your own data with ``python bench/search.py --n 1000000`` (numbers in ``bench/results/search.json``).

Example::

    features = np.load("proc/fridgeObjects/features.npy", mmap_mode="r")
    index = NearestNeighborIndex().build(features)
    distances, rows = index.search(features[:5], k=10)
    index.save("proc/fridgeObjects/features.faiss")
"""
import logging
import math
import os

import faiss
import numpy as np

from .distances import cosine_from_similarity, top_k
from ..data.fileio import atomic_path

__all__ = ["NearestNeighborIndex", "recall_at_k", "ANN_THRESHOLD", "EXACT_BACKEND", "KINDS"]

logger = logging.getLogger(__name__)

KINDS = ("auto", "exact", "ivf", "hnsw")
ANN_THRESHOLD = 200_000          # kind='auto' builds an approximate (IVF) index from this many vectors on
# Exact backend, measured with `python bench/search.py [--n 100000]` (1000 queries, k=10, dim 1280) on the shared
# 2-core AMD EPYC dev machine: numpy 90 vs FAISS flat 83 queries/s at N=100k, 7.2 vs 7.0 at N=1M (two runs each).
EXACT_BACKEND = "numpy"
IVF_LISTS_PER_SQRT_N = 4         # nlist = 4 sqrt(N), at most N / IVF_TRAIN_POINTS_PER_LIST
IVF_TRAIN_POINTS_PER_LIST = 39   # k-means sample: this many vectors per list (FAISS's own minimum)
IVF_KMEANS_ITERATIONS = 10       # k-means iterations when training the IVF lists
# Default nprobe = max(IVF_MIN_NPROBE, IVF_NPROBE_FRACTION * nlist). `python bench/search.py` measured recall@10
# 0.986 at nprobe 8 and 0.9997 at 20 of 4000 lists (N=1M, 42x exact), 0.986 at 4 and 0.998 at 8 of 1265 (N=100k).
IVF_NPROBE_FRACTION = 0.005      # -> nprobe 20 at N=1M
IVF_MIN_NPROBE = 8
HNSW_M = 32                      # HNSW graph degree
HNSW_EF_CONSTRUCTION = 80        # HNSW candidate list while building
HNSW_EF_SEARCH = 64              # default HNSW candidate list while searching
_CHUNK_BYTES = 64 * 2**20        # rows are normalised and added, and similarities computed, in blocks of about this


def _n_threads(n_threads):
    """Threads for FAISS: the given number, else the cores this process may run on."""
    return int(n_threads) if n_threads else len(os.sched_getaffinity(0))


def _normalized(block, dim, what):
    """``block`` as an L2-normalised float32 C-contiguous copy; zero rows stay zero."""
    block = np.asarray(block)
    if block.ndim != 2 or block.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {block.shape}")
    out = np.array(block, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise ValueError(f"{what}: rows {bad[:5].tolist()} hold NaN or infinite values")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def _chunks(n_rows, dim, rows=None):
    """``slice`` objects covering ``range(n_rows)`` in blocks of about ``_CHUNK_BYTES`` (or ``rows`` rows)."""
    step = rows or max(1, _CHUNK_BYTES // (4 * max(dim, 1)))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def recall_at_k(found, truth):
    """Fraction of the true nearest neighbours that were found.

    Parameters
    ----------
    found, truth : ndarray of shape (n_queries, k), int
        Row numbers from the approximate and the exact search; ``-1`` marks an empty slot.

    Returns
    -------
    float
        ``|found & truth| / |truth|`` summed over queries, in [0, 1].
    """
    found, truth = np.asarray(found), np.asarray(truth)
    hits = sum(np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth))
    total = int((truth >= 0).sum())
    return hits / total if total else 1.0


class NearestNeighborIndex:
    """k nearest neighbours by cosine similarity, exact or approximate, with incremental adds.

    ``__init__`` only stores settings; :meth:`build` creates the index from a feature matrix.

    Parameters
    ----------
    kind : {'auto', 'exact', 'ivf', 'hnsw'}
        ``'auto'``: ``'exact'`` below ``ann_threshold`` vectors, else ``'ivf'``.
    ann_threshold : int
        Vectors from which ``kind='auto'`` builds an IVF index.
    exact_backend : {'numpy', 'faiss'}
        Who compares queries with every reference in an exact index (same results, different speed).
    nlist : int or None
        IVF lists; None = ``4 sqrt(N)``, at most ``N / 39``.
    nprobe : int or None
        IVF lists scanned per query; None = ``max(8, 0.005 * nlist)`` (at most nlist).
    hnsw_m : int
        HNSW graph degree.
    ef_search : int or None
        HNSW candidate list size while searching; None = ``HNSW_EF_SEARCH``.
    batch_size : int
        Queries searched at a time.
    n_threads : int or None
        FAISS threads (``faiss.omp_set_num_threads``, process-wide); None = the cores this process may use.
    random_state : int
        Seed for the IVF training sample.
    """

    def __init__(self, kind="auto", *, ann_threshold=ANN_THRESHOLD, exact_backend=EXACT_BACKEND, nlist=None,
                 nprobe=None, hnsw_m=HNSW_M, ef_search=None, batch_size=1024, n_threads=None, random_state=0):
        self.kind = kind
        self.ann_threshold = ann_threshold
        self.exact_backend = exact_backend
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.batch_size = batch_size
        self.n_threads = n_threads
        self.random_state = random_state
        self._index = None

    # ------------------------------------------------------------------ building
    def build(self, features):
        """Create the index from a feature matrix, reading it in chunks.

        Parameters
        ----------
        features : array-like of shape (n_vectors, n_dims), float
            May be a ``np.memmap`` (``np.load(path, mmap_mode='r')``): it is normalised and added a chunk of about
            64 MiB at a time, so only the index itself (about ``4 * n_vectors * n_dims`` bytes) is held in RAM,
            plus for IVF a k-means sample of ``39 * nlist`` rows while training (1M x 1280: 5.1 + 0.8 GB).

        Returns
        -------
        self
        """
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.exact_backend not in ("numpy", "faiss"):
            raise ValueError(f"exact_backend must be 'numpy' or 'faiss', got {self.exact_backend!r}")
        if getattr(features, "ndim", None) != 2:
            features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must have shape (n_vectors, n_dims) with both > 0, got {features.shape}")
        faiss.omp_set_num_threads(_n_threads(self.n_threads))
        n, dim = features.shape
        kind = self.kind if self.kind != "auto" else ("ivf" if n >= self.ann_threshold else "exact")
        if kind == "exact":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index.hnsw.efSearch = self.ef_search or HNSW_EF_SEARCH
        else:
            index = self._trained_ivf(features)
        self._index = index
        self.add(features)
        logger.info("built a %s index of %d x %d vectors", kind, n, dim)
        return self

    def _trained_ivf(self, features):
        """An empty ``IndexIVFFlat`` whose lists are trained by k-means on a random sample of ``features``."""
        n, dim = features.shape
        nlist = self.nlist or max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // IVF_TRAIN_POINTS_PER_LIST))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] for {n} vectors, got {nlist}")
        rng = np.random.default_rng(self.random_state)
        n_train = min(n, nlist * IVF_TRAIN_POINTS_PER_LIST)
        rows = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else np.arange(n)
        sample = np.concatenate([_normalized(features[rows[s]], dim, "features")
                                 for s in _chunks(len(rows), dim)])
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.cp.niter = IVF_KMEANS_ITERATIONS
        index.cp.min_points_per_centroid = min(IVF_TRAIN_POINTS_PER_LIST, n_train // nlist)
        index.cp.seed = int(self.random_state)
        index.train(sample)
        index.nprobe = self.nprobe or min(nlist, max(IVF_MIN_NPROBE, math.ceil(IVF_NPROBE_FRACTION * nlist)))
        return index

    def add(self, vectors):
        """Append vectors without rebuilding (IVF: each is assigned to its nearest list; HNSW: linked in).

        Parameters
        ----------
        vectors : array-like of shape (n_new, n_dims), float
            Read a chunk at a time (a ``np.memmap`` is fine). Their row numbers continue from ``len(self)``.

        Returns
        -------
        self
        """
        index = self._built()
        if getattr(vectors, "ndim", None) != 2:
            vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != index.d:
            raise ValueError(f"vectors must have shape (n, {index.d}), got {getattr(vectors, 'shape', None)}")
        for rows in _chunks(vectors.shape[0], index.d):
            index.add(_normalized(vectors[rows], index.d, "vectors"))
        return self

    # ------------------------------------------------------------------ searching
    def search(self, queries, k, radius=None):
        """The ``k`` nearest references of each query.

        Parameters
        ----------
        queries : array-like of shape (n_queries, n_dims), float
            Normalised here; searched ``batch_size`` at a time.
        k : int
            Neighbours per query, >= 1; capped at ``len(self)``.
        radius : float or None
            Largest cosine distance kept (``1 - cos``, in [0, 2]). Neighbours farther away are dropped: their slot
            holds index ``-1`` and distance ``inf``. None = keep all ``k``.

        Returns
        -------
        distances : ndarray of shape (n_queries, min(k, len(self))), float32
            Cosine distances ``1 - cos``, ascending along each row; ``inf`` in empty slots.
        indices : ndarray of shape (n_queries, min(k, len(self))), int64
            Row numbers of the neighbours; ``-1`` in empty slots (outside ``radius``, or an approximate index that
            found fewer than ``k``).
        """
        index = self._built()
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if radius is not None and not 0 <= radius <= 2:
            raise ValueError(f"radius is a cosine distance in [0, 2], got {radius!r}")
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != index.d:
            raise ValueError(f"queries must have shape (n_queries, {index.d}), got {queries.shape}")
        k = min(int(k), index.ntotal)
        distances = np.empty((len(queries), k), np.float32)
        indices = np.empty((len(queries), k), np.int64)
        search = self._numpy_search if isinstance(index, faiss.IndexFlat) and self.exact_backend == "numpy" \
            else self._faiss_search
        for rows in _chunks(len(queries), index.d, rows=self.batch_size):
            sims, indices[rows] = search(_normalized(queries[rows], index.d, "queries"), k)
            distances[rows] = cosine_from_similarity(sims)
        missing = indices < 0
        if radius is not None:
            missing |= distances > radius
        distances[missing], indices[missing] = np.inf, -1
        return distances, indices

    def range_search(self, queries, radius):
        """Every reference within cosine distance ``radius`` of each query (FAISS range search).

        Exact for an ``'exact'`` index; an IVF index scans ``nprobe`` lists, an HNSW index its candidate list.

        Parameters
        ----------
        queries : array-like of shape (n_queries, n_dims), float
            Normalised here; searched ``batch_size`` at a time.
        radius : float
            Largest cosine distance kept (``1 - cos``, in [0, 2]), inclusive.

        Returns
        -------
        lims : ndarray of shape (n_queries + 1,), int64
            The neighbours of query ``i`` are ``rows[lims[i]:lims[i + 1]]``.
        distances : ndarray of shape (lims[-1],), float32
            Their cosine distances ``1 - cos``, in no particular order.
        rows : ndarray of shape (lims[-1],), int64
        """
        index = self._built()
        if not 0 <= radius <= 2:
            raise ValueError(f"radius is a cosine distance in [0, 2], got {radius!r}")
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != index.d:
            raise ValueError(f"queries must have shape (n_queries, {index.d}), got {queries.shape}")
        counts, distances, rows = [], [], []
        for block in _chunks(len(queries), index.d, rows=self.batch_size):
            # FAISS keeps similarities above its threshold; a little slack, then the exact cut on distances.
            lims, sims, found = index.range_search(_normalized(queries[block], index.d, "queries"),
                                                   1.0 - radius - 1e-5)
            dist = np.clip(1.0 - sims, 0.0, 2.0)
            keep = dist <= radius
            owner = np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
            counts.append(np.bincount(owner[keep], minlength=len(lims) - 1))
            distances.append(dist[keep])
            rows.append(found[keep].astype(np.int64))
        if not counts:
            return np.zeros(1, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
        lims = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        return lims, np.concatenate(distances), np.concatenate(rows)

    def _faiss_search(self, queries, k):
        """Similarities (n, k) and rows (n, k) from FAISS, best first."""
        return self._index.search(queries, k)

    def _numpy_search(self, queries, k):
        """Similarities (n, k) and rows (n, k) from a BLAS product with each chunk of the stored vectors."""
        index = self._index
        stored = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        n = len(queries)
        best_sims = np.full((n, k), -np.inf, np.float32)
        best_rows = np.full((n, k), -1, np.int64)
        per_chunk = max(k, _CHUNK_BYTES // (4 * max(n, 1)))
        for rows in _chunks(index.ntotal, index.d, rows=per_chunk):
            sims = queries @ stored[rows].T
            top = top_k(-sims, k)
            # The best so far come first, so equal similarities keep the lower row number.
            cand_sims = np.concatenate([best_sims, np.take_along_axis(sims, top, axis=1)], axis=1)
            cand_rows = np.concatenate([best_rows, top + rows.start], axis=1)
            keep = top_k(-cand_sims, k)
            best_sims = np.take_along_axis(cand_sims, keep, axis=1)
            best_rows = np.take_along_axis(cand_rows, keep, axis=1)
        return best_sims, best_rows

    def calibrate_recall(self, sample_queries, target=0.95, k=10):
        """Raise ``nprobe`` (IVF) or ``efSearch`` (HNSW) until recall@k against exact search reaches ``target``.

        The search width doubles from its current value until the recall measured on ``sample_queries`` reaches
        ``target`` or every list is scanned (IVF; HNSW stops at 4096). An exact index is left as it is.

        Parameters
        ----------
        sample_queries : array-like of shape (n_queries, n_dims), float
            Held-out vectors like the future queries (not stored in the index), a few hundred suffice.
        target : float
            Recall@k to reach, in (0, 1].
        k : int
            Neighbours compared.

        Returns
        -------
        float
            The recall@k measured at the chosen setting, which stays set (``self.nprobe`` / ``self.ef_search``).
        """
        index = self._built()
        if not 0 < target <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {target!r}")
        if isinstance(index, faiss.IndexFlat):
            return 1.0
        queries = _normalized(sample_queries, index.d, "sample_queries")
        k = min(k, index.ntotal)
        if isinstance(index, faiss.IndexHNSW):
            _, truth = index.storage.search(queries, k)
            width, limit = index.hnsw.efSearch, 4096
        else:
            nprobe = index.nprobe
            index.nprobe = index.nlist
            _, truth = index.search(queries, k)
            width, limit = nprobe, index.nlist
        while True:
            self.search_width = width
            recall = recall_at_k(self.search(queries, k)[1], truth)
            logger.info("search width %d: recall@%d = %.4f", width, k, recall)
            if recall >= target or width >= limit:
                return recall
            width = min(2 * width, limit)

    @property
    def n_lists(self):
        """Number of IVF lists (int), None for other kinds."""
        index = self._built()
        return int(index.nlist) if isinstance(index, faiss.IndexIVF) else None

    @property
    def search_width(self):
        """IVF ``nprobe`` or HNSW ``efSearch`` in use (int), None for an exact index; settable."""
        index = self._built()
        return None if isinstance(index, faiss.IndexFlat) else int(index.hnsw.efSearch) \
            if isinstance(index, faiss.IndexHNSW) else int(index.nprobe)

    @search_width.setter
    def search_width(self, width):
        index = self._built()
        if int(width) != width or width < 1:
            raise ValueError(f"search width must be a positive integer, got {width!r}")
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search = int(width)
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe = min(int(width), index.nlist)
        else:
            raise ValueError("an exact index has no search width")

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write the index with ``faiss.write_index``, atomically; nprobe / efSearch are stored with it.

        Parameters
        ----------
        path : str or Path
            Destination file (e.g. ``features.faiss``).
        """
        index = self._built()
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        return path

    @classmethod
    def load(cls, path, **settings):
        """Read an index written by :meth:`save`.

        Parameters
        ----------
        path : str or Path
            File written by :meth:`save`.
        **settings
            Constructor settings that apply to searching (``exact_backend``, ``batch_size``, ``n_threads``).

        Returns
        -------
        NearestNeighborIndex
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such index file")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise ValueError(f"{path}: not a FAISS index ({str(error).splitlines()[0]})") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: expected an inner-product index, got metric {index.metric_type}")
        if isinstance(index, faiss.IndexFlat):
            kind = "exact"
        elif isinstance(index, faiss.IndexHNSW):
            kind, settings["ef_search"] = "hnsw", index.hnsw.efSearch
        elif isinstance(index, faiss.IndexIVF):
            kind, settings["nlist"], settings["nprobe"] = "ivf", index.nlist, index.nprobe
        else:
            raise ValueError(f"{path}: unsupported FAISS index type {type(index).__name__}")
        self = cls(kind, **settings)
        faiss.omp_set_num_threads(_n_threads(self.n_threads))
        self._index = index
        return self

    # ------------------------------------------------------------------ introspection
    @property
    def dim(self):
        """Vector length ``n_dims``."""
        return self._built().d

    @property
    def built_kind(self):
        """The kind actually built: ``'exact'``, ``'ivf'`` or ``'hnsw'``."""
        index = self._built()
        return "exact" if isinstance(index, faiss.IndexFlat) else "hnsw" if isinstance(index, faiss.IndexHNSW) \
            else "ivf"

    def __len__(self):
        return self._index.ntotal if self._index is not None else 0

    def __repr__(self):
        if self._index is None:
            return f"NearestNeighborIndex(kind={self.kind!r}, not built)"
        return f"NearestNeighborIndex({self.built_kind}, {len(self)} x {self.dim})"

    def _built(self):
        if self._index is None:
            raise ValueError("the index is empty: call build(features) or NearestNeighborIndex.load(path) first")
        return self._index
