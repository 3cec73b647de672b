"""Near-duplicate images: perceptual hashes or CNN embeddings, searched at scale, grouped, reported and moved.

The imagededup flow (encode, then find duplicates), built to scale to millions of images, in three modules:

1. :func:`encode` (:mod:`.dedup_encode`) reads every image once and streams its encoding into an ``.npy`` with a
   JSON sidecar: packed hash bits or float32 features of the project's network, optionally of every flip and
   quarter turn.
2. :func:`find_duplicates` (here) puts the upright encodings into an index (a FAISS binary index for hashes, searched
   by exact Hamming range; the project's :class:`~image_similarity.index.NearestNeighborIndex` for embeddings,
   searched by cosine range), range-searches it a chunk of queries at a time with every view, keeping the nearest,
   and returns the connected components of the links. ``against=`` checks new images against an encoded set
   without re-encoding it. Memory beyond the index stays flat in N: encodings are read from the memory-mapped file.
3. :func:`save_groups_csv` and :func:`plots.plot_duplicate_groups` report them; :func:`move_duplicates`
   (:mod:`.dedup_move`) moves (never deletes) all but the kept image of each group, through a journal, so that a
   killed run can be re-run.

Step 1 calls the same code. From a shell (:mod:`.dedup_cli`)::

    python -m image_similarity.apps.dedup FOLDER [--method dhash|phash|ahash|whash|cnn] [--threshold T] [--invariant]
        [--against ENCODINGS.npy] [--out FILE.csv] [--move-duplicates DIR]
"""
import math
import os
from pathlib import Path

import faiss
import imagehash
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..data.fileio import save_csv
from .dedup_encode import (DEFAULT_THRESHOLDS, HASH_METHODS, METHODS, VIEWS, Encodings, check_settings,  # noqa: F401
                           encode, load_encodings)
from .dedup_move import move_duplicates  # noqa: F401 (re-exported)

__all__ = ["HASH_METHODS", "METHODS", "DEFAULT_THRESHOLDS", "VIEWS", "Encodings", "encode", "load_encodings",
           "check_settings", "find_links", "connected_groups", "find_duplicates", "group_rows", "save_groups_csv",
           "move_duplicates", "hash_images", "find_near_duplicate_groups", "kept_key", "duplicates_to_remove"]

MULTIHASH_FROM = 20_000    # from this many hashes, multi-index hashing (IndexBinaryMultiHash) instead of brute force
MIN_SUBSTRING_BITS = 16    # multi-index hashing splits the hash into substrings of at least this many bits
QUERY_CHUNK = 65_536       # encodings range-searched at a time


# ---------------------------------------------------------------------------------------------------- search
def _n_threads():
    return len(os.sched_getaffinity(0))


def _binary_index(n_bits, max_bits, n_hashes):
    """An exact FAISS binary index for range searches of radius ``max_bits``.

    Brute force (``IndexBinaryFlat``) for a few hashes; from :data:`MULTIHASH_FROM` on, multi-index hashing: the
    hash is cut into ``nhash`` substrings looked up with up to ``nflip`` flipped bits, and any two hashes at most
    ``max_bits`` apart share one such substring whenever ``nhash * (nflip + 1) > max_bits`` (pigeonhole), so the
    search stays exact. Measured by ``python bench/dedup.py``: 1M hashes in seconds, against ~25 min brute force.
    """
    if n_hashes >= MULTIHASH_FROM:
        for nflip in range(3):
            nhash = max(math.ceil((max_bits + 1) / (nflip + 1)), math.ceil(n_bits / 64))
            bits = min(64, n_bits // nhash)
            if bits >= MIN_SUBSTRING_BITS and nhash * (nflip + 1) > max_bits:
                index = faiss.IndexBinaryMultiHash(n_bits, nhash, bits)
                index.nflip = nflip
                return index
    return faiss.IndexBinaryFlat(n_bits)


class _HashSearch:
    """Range search of packed hashes by Hamming distance <= ``threshold`` bits."""

    def __init__(self, width, threshold, n_total):
        if int(threshold) != threshold or threshold < 0:
            raise ValueError(f"threshold for a hash is a whole number of bits >= 0, got {threshold!r}")
        self.threshold = int(threshold)
        faiss.omp_set_num_threads(_n_threads())
        self.index = _binary_index(8 * width, self.threshold, n_total)

    def add(self, vectors):
        for start in range(0, len(vectors), QUERY_CHUNK):
            self.index.add(np.ascontiguousarray(vectors[start:start + QUERY_CHUNK], np.uint8))

    def range_search(self, block):
        # FAISS keeps distances strictly below the radius.
        return self.index.range_search(np.ascontiguousarray(block, np.uint8), self.threshold + 1)

    @staticmethod
    def distance(a, b):
        """Hamming bits between packed hashes ``a`` (n, width) and ``b`` (width,)."""
        return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1).astype(np.float32)


class _EmbeddingSearch:
    """Range search of embeddings by cosine distance ``1 - cos <= threshold`` in the project's index."""

    def __init__(self, width, threshold, n_total):
        from ..search.index import NearestNeighborIndex
        if not 0 <= threshold <= 2:
            raise ValueError(f"threshold for 'cnn' is a cosine distance in [0, 2], got {threshold!r}")
        self.threshold = float(threshold)
        self.index, self.n_indexed = NearestNeighborIndex(), 0

    def add(self, vectors):
        """Index ``vectors`` (may be memory-mapped: the index reads it in chunks)."""
        if len(vectors):
            self.index.add(vectors) if self.n_indexed else self.index.build(vectors)
            self.n_indexed += len(vectors)

    def range_search(self, block):
        return self.index.range_search(block, self.threshold)

    @staticmethod
    def distance(a, b):
        """Cosine distances ``1 - cos`` between the rows of ``a`` (n, dim) and ``b`` (dim,)."""
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        return np.clip(1.0 - a @ (b / max(np.linalg.norm(b), 1e-12)), 0.0, 2.0).astype(np.float32)


def _compatible(encodings, against):
    keys = ("method", "hash_size", "model_id")
    mismatch = {k: (encodings.meta.get(k), against.meta.get(k)) for k in keys
                if encodings.meta.get(k) != against.meta.get(k)}
    if mismatch:
        raise ValueError(f"the encodings to check against were made differently: {mismatch} (new, against)")


def find_links(encodings, threshold=None, against=None, progress=True):
    """Every pair of images within ``threshold``, by range search of the upright encodings with every view.

    Parameters are those of :func:`find_duplicates`.

    Returns
    -------
    pairs : ndarray of shape (2, n_links), int64
        Row numbers: ``against``'s rows first (0 .. len(against) - 1), then those of ``encodings``. The first row
        of each link is an image of ``encodings``; a pair may appear more than once (from several views).
    distances : ndarray of shape (n_links,), float32
        Hamming bits or cosine distances.
    """
    threshold = DEFAULT_THRESHOLDS[encodings.method] if threshold is None else threshold
    if against is not None:
        _compatible(encodings, against)
    n_old, n_new = len(against) if against is not None else 0, len(encodings)
    pairs, distances = [np.empty((2, 0), np.int64)], [np.empty(0, np.float32)]
    if n_new == 0 or n_old + n_new < 2:
        return pairs[0], distances[0]
    search_class = _EmbeddingSearch if encodings.method == "cnn" else _HashSearch
    search = search_class(encodings.array.shape[2], threshold, n_old + n_new)
    for source in (against, encodings):
        if source is not None:
            search.add(source.array[:, 0])
    with tqdm(total=n_new, desc="searching", unit="img", disable=not progress) as bar:
        for start in range(0, n_new, QUERY_CHUNK):
            block = np.asarray(encodings.array[start:start + QUERY_CHUNK])
            for view in range(block.shape[1]):
                lims, found_distances, rows = search.range_search(np.ascontiguousarray(block[:, view]))
                queries = n_old + start + np.repeat(np.arange(len(block)), np.diff(lims).astype(np.int64))
                links = queries != rows
                pairs.append(np.stack([queries[links], rows[links].astype(np.int64)]))
                distances.append(found_distances[links].astype(np.float32))
            bar.update(len(block))
    return np.concatenate(pairs, axis=1), np.concatenate(distances)


def connected_groups(pairs, n_rows):
    """Connected components of ``pairs`` (2, n_links) over ``n_rows`` rows: a list of sorted row lists, 2+ each."""
    graph = coo_matrix((np.ones(pairs.shape[1], np.int8), (pairs[0], pairs[1])), shape=(n_rows, n_rows))
    _, component = connected_components(graph, directed=False)
    linked = np.unique(pairs)
    members = {}
    for row, comp in zip(linked.tolist(), component[linked].tolist()):
        members.setdefault(comp, []).append(row)
    return list(members.values())


def find_duplicates(encodings, threshold=None, against=None, progress=True):
    """Groups of near-duplicates: connected components of the pairs within ``threshold``.

    Parameters
    ----------
    encodings : Encodings
        From :func:`encode` or :func:`load_encodings`. With ``invariant`` encodings each of an image's views is
        compared with the upright encodings and the nearest counts.
    threshold : int or float, optional
        Largest distance of a near-duplicate: Hamming bits for hashes (0 = identical hashes), cosine distance
        ``1 - cos`` for ``'cnn'``; default :data:`DEFAULT_THRESHOLDS` of the method. Inclusive.
    against : Encodings, optional
        An existing encoded set. Images of ``encodings`` are linked with it and with each other; links within
        ``against`` are not searched. Its keys appear as its ``root`` joined with the key (or unchanged when both
        sets share their root). Both must come from the same method and settings.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    list of list of (str, float)
        One list per group of two or more images holding at least one image of ``encodings``: the kept image first
        (the first key in sort order, preferring an image of ``against``) with distance 0, then the others sorted
        by key with their distance to the kept image. Groups are sorted by their kept key. A~B and B~C put A, B, C
        together even when A and C are further apart.
    """
    pairs, _ = find_links(encodings, threshold, against, progress)
    old = against if against is not None else Encodings([], encodings.array[:0], encodings.meta)
    n_old = len(old)
    same_root = against is not None and old.meta.get("root") == encodings.meta.get("root")
    name = lambda row: (encodings.keys[row - n_old] if row >= n_old else  # noqa: E731
                        old.keys[row] if same_root or not old.meta.get("root") else
                        str(Path(old.meta["root"]) / old.keys[row]))
    encoding = lambda row: encodings.array[row - n_old] if row >= n_old else old.array[row, :1]  # noqa: E731
    distance = _EmbeddingSearch.distance if encodings.method == "cnn" else _HashSearch.distance
    groups = []
    for rows in connected_groups(pairs, n_old + len(encodings)):
        rows = sorted(rows, key=lambda row: (row >= n_old, name(row)))   # an image of `against` is kept first
        kept, others = rows[0], sorted(rows[1:], key=name)
        upright = np.asarray(encoding(kept)[0])
        groups.append([(name(kept), 0.0)] + [(name(row), float(distance(np.asarray(encoding(row)), upright).min()))
                                             for row in others])
    return sorted(groups)


def group_rows(groups):
    """CSV rows ``(group, key, status, distance)``: group numbers from 1, status ``kept`` or ``duplicate``."""
    return [(number, key, "kept" if position == 0 else "duplicate", f"{distance:g}")
            for number, group in enumerate(groups, 1) for position, (key, distance) in enumerate(group)]


def save_groups_csv(path, groups):
    """Write the groups CSV (columns group, key, status, distance) atomically; returns the path."""
    return save_csv(path, ["group", "key", "status", "distance"], group_rows(groups))



# ---------------------------------------------------------------------------------------------------- the old API
def hash_images(sources, root=None, hash_size=16, skipped=None, method="dhash", progress=True):
    """Perceptual hash of every readable image, as ``imagehash.ImageHash`` objects.

    Parameters are those of :func:`encode`.

    Returns
    -------
    dict of str to imagehash.ImageHash
        One entry per readable image, in input order.
    """
    if method not in HASH_METHODS:
        raise ValueError(f"unknown hash method {method!r}; choose one of {', '.join(HASH_METHODS)}")
    encoded = encode(sources, root, method=method, hash_size=hash_size, skipped=skipped, progress=progress)
    n_bits = hash_size * hash_size
    return {key: imagehash.ImageHash(np.unpackbits(row[0])[:n_bits].reshape(hash_size, hash_size).astype(bool))
            for key, row in zip(encoded.keys, encoded.array)}


def find_near_duplicate_groups(hashes, max_distance):
    """Groups of images linked by hashes at most ``max_distance`` bits apart.

    Parameters
    ----------
    hashes : dict of str to imagehash.ImageHash
        From :func:`hash_images`; all of the same size.
    max_distance : int
        Largest Hamming distance, in bits, at which two images are near-duplicates; 0 = identical hashes only.

    Returns
    -------
    list of list of str
        Connected groups of two or more keys, each sorted, groups sorted by their first key.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0 bits, got {max_distance}")
    keys = list(hashes)
    if len(keys) < 2:
        return []
    array = np.stack([np.packbits(hashes[k].hash.ravel()) for k in keys])[:, None, :]
    groups = find_duplicates(Encodings(keys, array, {"method": "dhash"}), max_distance, progress=False)
    return [sorted(key for key, _ in group) for group in groups]


def kept_key(group):
    """The image kept from a group of near-duplicates: the first key in sort order."""
    return min(group)


def duplicates_to_remove(groups):
    """Every key of every group except the kept one, sorted."""
    return sorted(key for group in groups for key in group if key != kept_key(group))



if __name__ == "__main__":
    from .dedup_cli import main
    main()
