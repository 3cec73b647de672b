"""Near-duplicate images: perceptual hashes or CNN embeddings, searched at scale, grouped, reported and moved.

The imagededup flow (encode, then find duplicates), built to scale to millions of images:

1. :func:`encode` reads every image once and streams its encoding into an ``.npy`` with a JSON sidecar (keys and
   settings): packed bits for the hashes of :data:`HASH_METHODS`, float32 features of the project's network for
   ``'cnn'``. With ``invariant=True`` it also encodes the image's flips and quarter turns (:data:`VIEWS`).
2. :func:`find_duplicates` puts the upright encodings into an index (a FAISS binary index for hashes, searched by
   exact Hamming range; the project's :class:`~image_similarity.index.NearestNeighborIndex` for embeddings, searched
   by cosine range), range-searches it a chunk of queries at a time with every view, keeping the nearest, and
   returns the connected components of the links. ``against=`` checks new images against an encoded set without
   re-encoding it. Memory beyond the index stays flat in N: encodings are read from the memory-mapped file.
3. :func:`save_groups_csv` and :func:`plots.plot_duplicate_groups` report them; :func:`move_duplicates` moves
   (never deletes) all but the kept image of each group, through a journal, so that a killed run can be re-run.

Step 1 calls the same code. From a shell::

    python -m image_similarity.apps.dedup FOLDER [--method dhash|phash|ahash|whash|cnn] [--threshold T] [--invariant]
        [--against ENCODINGS.npy] [--out FILE.csv] [--move-duplicates DIR]
"""
import argparse
import copy
import csv
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..data.fileio import atomic_path, load_json, save_csv, save_json
from ..data.images import SkippedImages, image_key, list_images, load_image

__all__ = ["HASH_METHODS", "METHODS", "DEFAULT_THRESHOLDS", "VIEWS", "Encodings", "encode", "load_encodings",
           "find_links", "connected_groups", "find_duplicates", "group_rows", "save_groups_csv", "move_duplicates", "hash_images",
           "find_near_duplicate_groups", "kept_key", "duplicates_to_remove"]

logger = logging.getLogger(__name__)

# One driver (encode) for every hash; each variant is only its formula, all from imagehash.
HASH_METHODS = {
    "dhash": imagehash.dhash,          # horizontal gradient signs: robust to resizing and recompression
    "phash": imagehash.phash,          # low DCT frequencies
    "ahash": imagehash.average_hash,   # above or below the mean grey level
    "whash": imagehash.whash,          # Haar wavelet low band (hash_size must be a power of 2)
}
METHODS = (*HASH_METHODS, "cnn")
# Defaults: Hamming bits of a 256-bit hash (hash_size 16), cosine distance 1 - cos for 'cnn'. dhash keeps step 1's
# long-standing 10 bits. The others are the largest threshold at which precision stayed 1.000 on a tuning set that
# the reported numbers do not use: `python bench/dedup.py quality --dataset data/fridgeObjects --n-originals 40
# --n-distractors 60` (bench/results/dedup_quality_fridgeObjects.json); phash never dropped below 1.000 up to 80
# bits and is capped at 64, where unrelated hashes (128 +- 8 bits apart) are 8 standard deviations away.
DEFAULT_THRESHOLDS = {"dhash": 10, "phash": 64, "ahash": 16, "whash": 20, "cnn": 0.09}
DEFAULT_MODEL = "efficientnet_lite0"   # backbone name or refined checkpoint for 'cnn'
# The 8 symmetries of the square: the upright image first, then its flips and quarter turns.
VIEWS = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
         Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE,
         Image.Transpose.TRANSVERSE)
MULTIHASH_FROM = 20_000    # from this many hashes, multi-index hashing (IndexBinaryMultiHash) instead of brute force
MIN_SUBSTRING_BITS = 16    # multi-index hashing splits the hash into substrings of at least this many bits
QUERY_CHUNK = 65_536       # encodings range-searched at a time
PRINTED_GROUPS = 20        # groups the command line prints (all are in the CSV)


def _view(img, view):
    return img if view is None else img.transpose(view)


def _views(invariant):
    return VIEWS if invariant else VIEWS[:1]


# ---------------------------------------------------------------------------------------------------- encodings
@dataclass
class Encodings:
    """Encoded images: one row per image, one slice per view.

    Attributes
    ----------
    keys : list of str
        Paths relative to ``meta['root']`` ('label/file.jpg'), or any names.
    array : ndarray of shape (n_images, n_views, width)
        uint8 packed hash bits (``width = n_bits / 8``) or float32 features (``width = dim``); view 0 is upright.
        Usually memory-mapped from the ``.npy``.
    meta : dict
        ``method``, ``invariant``, ``root``, and ``hash_size`` (hashes) or ``model_id`` (cnn).
    """

    keys: list
    array: np.ndarray
    meta: dict

    @property
    def method(self):
        return self.meta["method"]

    def __len__(self):
        return len(self.keys)


def _sidecar_path(path):
    return Path(path).with_suffix(".json")


class _EncodingsSink:
    """Where :func:`encode` writes: an ``(n_max, width)`` array in memory, or a .npy at a temporary path that
    :meth:`finish` cuts to the rows written and renames into place, then writes the sidecar. A context manager:
    an exception removes the temporary file."""

    def __init__(self, path, n_max, width, dtype):
        self.path, self.dtype, self._atomic = path and Path(path), np.dtype(dtype), None
        if self.path is None:
            self.array = np.empty((n_max, width), self.dtype)
            return
        _sidecar_path(path).unlink(missing_ok=True)   # no finished-looking pair while the new one is written
        self._atomic = atomic_path(path)
        self.tmp = self._atomic.__enter__()
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=self.dtype, shape=(max(n_max, 1), width))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self._atomic is not None:
            self.array = None
            self._atomic.__exit__(*exc_info)

    def finish(self, keys, meta, n_views):
        """The :class:`Encodings` of the first ``len(keys)`` rows (from the file when there is one)."""
        n_rows, width = len(keys), self.array.shape[1]
        if self.path is None:
            return Encodings(keys, self.array[:n_rows].reshape(n_rows, n_views, width // n_views), meta)
        self.array.flush()
        self.array = None
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (n_rows, width)}
        with open(self.tmp, "rb+") as handle:
            np.lib.format.read_magic(handle)
            np.lib.format.read_array_header_1_0(handle)
            offset = handle.tell()
            handle.seek(0)
            np.lib.format.write_array_header_1_0(handle, header)
            if handle.tell() != offset:
                raise RuntimeError(f"{self.path}: the .npy header changed size when rewritten")
            handle.truncate(offset + n_rows * width * self.dtype.itemsize)
        self._atomic.__exit__(None, None, None)
        self._atomic = None
        save_json(_sidecar_path(self.path), {**meta, "n_images": n_rows, "keys": list(keys)})
        return load_encodings(self.path)


def load_encodings(path):
    """Read an encodings ``.npy`` and its sidecar written by :func:`encode` (memory-mapped).

    Raises
    ------
    FileNotFoundError
        When either file is missing (the sidecar is written last: without it the encoding did not finish).
    ValueError
        When the two disagree.
    """
    path = Path(path)
    for required in (path, _sidecar_path(path)):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found (encodings incomplete: encode the images again)")
    meta = load_json(_sidecar_path(path))
    keys = meta.pop("keys")
    flat = np.load(path, mmap_mode="r", allow_pickle=False)
    n_views = len(_views(meta.get("invariant", False)))
    if flat.ndim != 2 or flat.shape[0] != len(keys) or flat.shape[1] % n_views:
        raise ValueError(f"{path} has shape {flat.shape} but {_sidecar_path(path)} lists {len(keys)} keys with "
                         f"{n_views} view(s) each: the two files do not belong together")
    return Encodings(keys, flat.reshape(len(keys), n_views, flat.shape[1] // n_views), meta)


def _check_method(method, hash_size):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(hash_size, int) or hash_size < 2:
        raise ValueError(f"hash_size must be an integer >= 2, got {hash_size!r}")
    if method == "whash" and hash_size & (hash_size - 1):
        raise ValueError(f"whash needs a power-of-2 hash_size, got {hash_size}")


def _resolve(source, root):
    path = Path(source)
    if root is not None and not path.is_absolute() and not path.is_relative_to(root):
        path = Path(root) / path
    return path


def _key(source, path, root):
    return image_key(path, root) if root is not None else str(source)


def _hash_bits(img, method, hash_size):
    """The packed bits (uint8, ``ceil(hash_size**2 / 8)`` bytes; zero padding changes no distance) of one hash."""
    return np.packbits(HASH_METHODS[method](img, hash_size=hash_size).hash.ravel())


def encode(sources, root=None, path=None, method="dhash", hash_size=16, invariant=False, model=DEFAULT_MODEL,
           skipped=None, progress=True, batch_size=64, n_workers=2, device=None):
    """Encode every readable image, streaming into ``path`` (.npy + .json sidecar) or into memory.

    Parameters
    ----------
    sources : iterable of str or Path
        Image paths, or keys relative to ``root``.
    root : str or Path, optional
        The image folder; results are keyed by the path relative to it, else by ``str(source)``.
    path : str or Path, optional
        Where to write the encodings (an ``.npy``; the sidecar ``.json`` is written last). None = in memory.
    method : str
        One of :data:`METHODS`.
    hash_size : int
        Hash grid side: ``hash_size**2`` bits (hash methods only).
    invariant : bool
        Also encode the 7 flips and quarter turns of :data:`VIEWS` (8 times the work and the file size).
    model : str, Path or Embedder
        Backbone name, refined checkpoint or a loaded :class:`~image_similarity.embedder.Embedder` (``'cnn'`` only).
    skipped : SkippedImages, optional
        Unreadable images are recorded here and logged once each, never raised.
    progress : bool
        Show a tqdm progress bar.
    batch_size, n_workers, device
        Forward-pass batch, DataLoader workers and device (``'cnn'`` only).

    Returns
    -------
    Encodings
        One row per readable image, in input order.
    """
    _check_method(method, hash_size)
    sources = list(sources)
    views = _views(invariant)
    meta = {"method": method, "invariant": bool(invariant), "root": str(Path(root).resolve()) if root else None}
    if method == "cnn":
        return _encode_cnn(sources, root, path, views, model, skipped, batch_size, n_workers, device, meta)
    meta["hash_size"] = hash_size
    width = -(-hash_size * hash_size // 8)
    keys = []
    with _EncodingsSink(path, len(sources), len(views) * width, np.uint8) as sink:
        for source in tqdm(sources, desc=f"hashing ({method})", unit="img", disable=not progress):
            image_path = _resolve(source, root)
            img = load_image(image_path, skipped)
            if img is not None:
                sink.array[len(keys)] = np.concatenate([_hash_bits(_view(img, v), method, hash_size) for v in views])
                keys.append(_key(source, image_path, root))
        return sink.finish(keys, meta, len(views))


class _ViewTransform:
    """A backbone's eval transform applied to one flip or quarter turn of the image (picklable for workers)."""

    def __init__(self, transform, view):
        self.transform, self.view = transform, view

    def to_uint8(self, img):
        return self.transform.to_uint8(_view(img, self.view))

    def normalize(self, pixels):
        return self.transform.normalize(pixels)


def _embed_files(paths, root, embedder, view, skipped, batch_size, n_workers):
    """Yield ``(keys, features)`` batches of one view of the image files, through the embedder's one loop."""
    viewed = copy.copy(embedder)
    viewed.transform = _ViewTransform(embedder.transform, view)
    yield from viewed.iter_files(paths, root, batch_size, n_workers, skipped)


def _encode_cnn(sources, root, path, views, model, skipped, batch_size, n_workers, device, meta):
    if root is None:
        raise ValueError("method 'cnn' needs the image folder (root) to key its features")
    from ..models.embedder import Embedder, load_embedder   # torch only when 'cnn' is used
    from ..models.inference import InferenceConfig
    embedder = model if isinstance(model, Embedder) else load_embedder(model, InferenceConfig(device=device))
    dim = embedder.dim
    meta.update(model_id=embedder.model_id, backbone=embedder.backbone, dim=dim)
    paths = [_resolve(source, root) for source in sources]
    keys = []
    with _EncodingsSink(path, len(paths), len(views) * dim, np.float32) as sink:
        for batch_keys, rows in _embed_files(paths, root, embedder, views[0], skipped, batch_size, n_workers):
            sink.array[len(keys):len(keys) + len(rows), :dim] = rows
            keys.extend(batch_keys)
        readable = [Path(root) / key for key in keys]   # the other views: only the readable files, no new warnings
        for number, view in enumerate(views[1:], 1):
            done = 0
            for _, rows in _embed_files(readable, root, embedder, view, None, batch_size, n_workers):
                sink.array[done:done + len(rows), number * dim:(number + 1) * dim] = rows
                done += len(rows)
        return sink.finish(keys, meta, len(views))


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


# ---------------------------------------------------------------------------------------------------- moving
JOURNAL_NAME = "moved.tsv"   # in the --move-duplicates folder: one "source<TAB>destination" line per move


def _same_file(a, b):
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


def _finish_move(source, destination):
    """Complete one journalled move; True when ``destination`` holds the file and ``source`` is gone."""
    if destination.exists() and not source.exists():
        return True
    if source.exists() and destination.exists():
        if not _same_file(source, destination):
            logger.warning("not moving %s: %s exists and differs", source, destination)
            return False
        source.unlink()   # a copy across file systems finished before the kill: the file is at its destination
        return True
    if not source.exists():
        logger.warning("cannot move %s: the file is gone", source)
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, destination)   # atomic on one file system
    except OSError:
        with atomic_path(destination) as tmp:   # across file systems: a complete copy appears atomically
            shutil.copy2(source, tmp)
        source.unlink()
    return True


def move_duplicates(groups, folder, destination):
    """Move every duplicate (never the kept image) from ``folder`` to the same relative path under ``destination``.

    The whole plan is first appended to the journal ``destination/moved.tsv`` and synced; then each file is moved
    by an atomic rename. A run killed at any point and re-run first completes the journalled plan, so no file is
    lost or moved twice. Images of an ``against`` set (absolute keys) are not touched.

    Returns
    -------
    list of (Path, Path)
        The moves done or completed by this call.
    """
    folder, destination = Path(folder), Path(destination)
    if destination.resolve() == folder.resolve() or folder.resolve() in destination.resolve().parents:
        raise ValueError(f"--move-duplicates {destination} must lie outside {folder}, or a re-run would scan it")
    destination.mkdir(parents=True, exist_ok=True)
    journal = destination / JOURNAL_NAME
    plan = []
    if journal.exists():
        with open(journal, encoding="utf-8", newline="") as handle:
            plan = [tuple(map(Path, row)) for row in csv.reader(handle, delimiter="\t") if len(row) == 2]
    new = [(folder / key, destination / key) for group in groups for key, _ in group[1:]
           if not Path(key).is_absolute()]
    journalled = set(plan)
    new = [(source, target) for source, target in new if source.exists() and (source, target) not in journalled]
    for source, target in [move for move in new if move[1].exists()]:
        logger.warning("not moving %s: %s already exists and is not in %s", source, target, journal)
        new.remove((source, target))
    with open(journal, "a", encoding="utf-8", newline="") as handle:
        handle.writelines(f"{source}\t{target}\n" for source, target in new)
        handle.flush()
        os.fsync(handle.fileno())
    done = []
    for source, target in plan + new:
        if source.exists() and _finish_move(source, target):
            done.append((source, target))
    return done


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


# ---------------------------------------------------------------------------------------------------- command line
def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m image_similarity.apps.dedup",
        description="Find groups of near-duplicate images in a folder; write them as CSV and a contact sheet, and "
                    "optionally move the duplicates away (never deleting them).")
    parser.add_argument("folder", type=Path, help="folder searched recursively for images")
    parser.add_argument("--method", choices=METHODS, default="dhash", help="how images are compared (default dhash)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="largest distance of a near-duplicate: Hamming bits for hashes, cosine distance for "
                             "cnn (default: " + ", ".join(f"{m} {t}" for m, t in DEFAULT_THRESHOLDS.items()) + ")")
    parser.add_argument("--max-distance", type=int, dest="threshold", help=argparse.SUPPRESS)  # the old name
    parser.add_argument("--hash-size", type=int, default=16, help="hash grid side; hash_size**2 bits (default 16)")
    parser.add_argument("--invariant", action="store_true",
                        help="also match flipped and quarter-turned copies (8x the encoding work)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"backbone or checkpoint for cnn ({DEFAULT_MODEL})")
    parser.add_argument("--against", type=Path, metavar="ENCODINGS",
                        help="an encodings .npy written by an earlier run: new images are checked against it")
    parser.add_argument("--out", type=Path, help="groups CSV (default: FOLDER_near_duplicates_METHOD.csv beside "
                                                 "FOLDER); the contact sheet .png and .encodings.npy go beside it")
    parser.add_argument("--move-duplicates", type=Path, metavar="DIR",
                        help="move every duplicate to DIR/<key> (journal DIR/moved.tsv; re-run after a kill)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    if args.against is not None and not args.against.is_file():
        parser.error(f"--against {args.against} not found")
    if args.method != "cnn" and args.threshold is not None and args.threshold != int(args.threshold):
        parser.error(f"--threshold for {args.method} is a whole number of bits, got {args.threshold:g}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ..pipeline.plots import plot_duplicate_groups
    folder_name = args.folder.resolve().name
    out = args.out or args.folder.resolve().parent / f"{folder_name}_near_duplicates_{args.method}.csv"
    encodings_path = out.with_suffix(".encodings.npy")
    against = load_encodings(args.against) if args.against is not None else None
    if against is not None:
        if encodings_path.resolve() == args.against.resolve():
            parser.error(f"--out {out} would overwrite the encodings given to --against; choose another --out")
        wanted = {"method": args.method, "hash_size": None if args.method == "cnn" else args.hash_size}
        if args.method == "cnn":
            from ..models.backbones import model_id
            wanted["model_id"] = model_id(args.model)
        differs = {k: (v, against.meta.get(k)) for k, v in wanted.items() if v != against.meta.get(k)}
        if differs:
            parser.error(f"--against {args.against} was encoded differently: " + ", ".join(
                f"{k} {new!r} here, {old!r} there" for k, (new, old) in differs.items()))
    skipped = SkippedImages()
    paths = list_images(args.folder, skipped=skipped)
    if against is not None and against.meta.get("root") == str(args.folder.resolve()):
        known = set(against.keys)    # the same folder encoded before: only its new images are encoded
        paths = [p for p in paths if image_key(p, args.folder) not in known]
    threshold = args.threshold if args.method == "cnn" or args.threshold is None else int(args.threshold)
    encodings = encode(paths, root=args.folder, path=encodings_path, method=args.method, hash_size=args.hash_size,
                       invariant=args.invariant, model=args.model, skipped=skipped)
    groups = find_duplicates(encodings, threshold, against)
    save_groups_csv(out, groups)
    sheet = plot_duplicate_groups(groups, args.folder, out.with_suffix(".png"))
    for number, group in enumerate(groups[:PRINTED_GROUPS], 1):
        print(f"group {number}: {group[0][0]} (kept), " + ", ".join(key for key, _ in group[1:]))
    if len(groups) > PRINTED_GROUPS:
        print(f"... {len(groups) - PRINTED_GROUPS} more group(s) in {out}")
    n_duplicates = sum(len(group) - 1 for group in groups)
    print(f"{len(groups)} group(s) of near-duplicates in {len(encodings)} image(s) under {args.folder}"
          + (f" checked against {len(against)} in {args.against}" if against is not None else "")
          + f"; {n_duplicates} would be removed")
    print(f"wrote {out}, {sheet} and {encodings_path}")
    if args.move_duplicates is not None:
        moved = move_duplicates(groups, args.folder, args.move_duplicates)
        print(f"moved {len(moved)} duplicate(s) to {args.move_duplicates} (log: "
              f"{args.move_duplicates / JOURNAL_NAME})")
    if skipped:
        print(skipped.summary())


if __name__ == "__main__":
    _main()
