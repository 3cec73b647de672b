"""The one features store: a float32 .npy plus a JSON sidecar (keys, model_id, backbone, dim).

Features are keyed by the image's path relative to its folder ("label/file.jpg"). Step 3 streams them straight into
the ``.npy`` file from an :class:`embedder.Embedder` (:func:`featurize_to_file`), so a million images never need
their matrix in memory; A2 keeps a store up to date with a folder (:func:`update_features`); A5 and a saved
``SimilarityModel`` write the same format (:func:`save_features`).
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fileio import atomic_path, json_text, load_json
from .images import image_key

logger = logging.getLogger(__name__)

__all__ = ["featurize_to_file", "update_features", "save_features", "load_features", "Features", "sidecar_path"]


def sidecar_path(path):
    """The JSON beside a features ``.npy``: keys, model_id, backbone, dim."""
    return Path(path).with_suffix(".json")


def _sidecar(keys, dim, meta):
    missing = {"model_id", "backbone"} - set(meta)
    if missing:
        raise ValueError(f"features metadata needs {sorted(missing)}")
    return {**meta, "dim": int(dim), "n_images": len(keys), "keys": list(keys)}


@contextmanager
def _publishing(path):
    """Yield ``(npy_tmp, sidecar)``: write the matrix to ``npy_tmp`` and fill the ``sidecar`` dict; on success the
    pair replaces the store at ``path``.

    Both files are complete beside the store before anything is replaced, so a full disk or a kill while writing
    leaves the earlier store whole. Then the old sidecar is removed, the matrix renamed in and the sidecar last: a
    kill between the two renames leaves a matrix without a sidecar, which readers take for an unfinished store
    (never old keys over new rows).
    """
    sidecar = {}
    side = sidecar_path(path)
    with atomic_path(side) as json_tmp, atomic_path(path) as npy_tmp:
        yield npy_tmp, sidecar
        json_tmp.write_text(json_text(sidecar), encoding="utf-8")
        side.unlink(missing_ok=True)


def save_features(path, keys, matrix, meta):
    """Write ``matrix`` (N, D) as float32 ``path`` (.npy) and the sidecar JSON, replacing a store as one.

    Parameters
    ----------
    keys : list of str, length N
    matrix : ndarray of shape (N, D)
    meta : dict
        Must hold ``model_id`` and ``backbone``; ``dim`` and ``keys`` are added.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(keys):
        raise ValueError(f"{path}: {len(keys)} keys for a matrix of shape {matrix.shape}")
    with _publishing(path) as (npy_tmp, sidecar), open(npy_tmp, "wb") as handle:
        np.save(handle, matrix)
        sidecar.update(_sidecar(keys, matrix.shape[1], meta))
    return Path(path)


def featurize_to_file(paths, root, embedder, path, batch_size=64, n_workers=2, skipped=None, meta=None):
    """Embed image files straight into ``path`` (.npy, float32) and its sidecar; memory stays flat.

    Rows are appended to a temporary ``.npy`` as batches arrive; the header is fixed up to the number of readable
    images at the end (numpy leaves room for that), then the pair replaces the store (an earlier store stays whole
    until then).

    Parameters
    ----------
    paths : list of Path
        Image files under ``root`` (keys are the paths relative to it).
    embedder : embedder.Embedder
    batch_size, n_workers, skipped
        As :meth:`embedder.Embedder.iter_batches`.
    meta : dict, optional
        Extra sidecar entries.

    Returns
    -------
    Features
        Memory-mapped.
    """
    dim = embedder.dim
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    keys = []
    with _publishing(path) as (tmp, sidecar), open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (len(paths), dim)})
        offset = handle.tell()
        for batch_keys, rows in embedder.iter_files(paths, root, batch_size, n_workers, skipped):
            handle.write(np.ascontiguousarray(rows, np.float32).tobytes())
            keys.extend(batch_keys)
        handle.seek(0)
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (len(keys), dim)})
        if handle.tell() != offset:
            raise RuntimeError(f"{path}: the .npy header changed size when rewritten")
        handle.truncate(offset + len(keys) * dim * 4)
        meta = {"model_id": embedder.model_id, "backbone": embedder.backbone, **(meta or {})}
        sidecar.update(_sidecar(keys, dim, meta))
    return load_features(path)


def _stamp(path):
    """``[size in bytes, modification time in ns]``: a file whose stamp is unchanged is not embedded again."""
    status = Path(path).stat()
    return [status.st_size, status.st_mtime_ns]


def update_features(paths, root, path, model, batch_size=64, n_workers=2, skipped=None, inference=None):
    """Bring the store at ``path`` up to date with image files: embed only new or changed ones, drop removed ones.

    Every file's size and modification time are kept in the sidecar (``stamps``); a file whose stamp is unchanged
    keeps its stored row. A store made by another network is recomputed; the network is only loaded when some image
    must be embedded. A store whose sidecar is missing or does not match its matrix (a run killed between the two
    renames) is rebuilt, with a warning naming it.

    Parameters
    ----------
    paths : list of Path
        The image files the store must hold, under ``root`` (keys are the paths relative to it).
    path : str or Path
        The store's ``.npy`` (created if missing).
    model : str or Path
        A backbone name or a refined checkpoint (``embedder.load_embedder``).
    batch_size, n_workers, skipped
        As :meth:`embedder.Embedder.iter_batches`.
    inference : models.inference.InferenceConfig, optional
        Device, threads and inference engine of the network (``embedder.load_embedder``); default its defaults.

    Returns
    -------
    features : Features
        The store now, rows in the order of ``paths`` (unreadable images left out).
    counts : dict
        ``embedded``, ``reused``, ``dropped`` (keys no longer among ``paths``) and ``recomputed`` (True when the
        store came from another network).

    Raises
    ------
    ValueError
        When ``path`` exists but is not a features store, nor a float32 matrix left by one (it is left alone).
    """
    from ..models.backbones import model_id as identify
    from ..models.embedder import load_embedder

    path, paths = Path(path), [Path(p) for p in paths]
    keys = [image_key(p, root) for p in paths]
    stamps, wanted = {k: _stamp(p) for k, p in zip(keys, paths)}, identify(model)
    rows, stored, recomputed = {}, None, False
    if path.exists():
        stored = _stored_or_none(path)
    if stored is not None:
        recomputed = stored.meta["model_id"] != wanted
        if not recomputed:
            old_stamps = stored.meta.get("stamps", {})
            rows = {k: row for k, row in zip(stored.keys, stored.matrix)
                    if k in stamps and old_stamps.get(k) == stamps[k]}
            meta = {"backbone": stored.meta["backbone"], "dim": stored.meta["dim"]}
    todo = [p for k, p in zip(keys, paths) if k not in rows]
    new_keys = []
    if todo:
        embedder = load_embedder(model, inference)
        meta = {"backbone": embedder.backbone, "dim": embedder.dim}
        new_keys, new_rows = embedder.embed_files(todo, root, batch_size, n_workers, skipped)
        rows.update(zip(new_keys, new_rows))
    kept = [k for k in keys if k in rows]
    matrix = np.array([rows[k] for k in kept], np.float32).reshape(len(kept), meta["dim"])
    save_features(path, kept, matrix, {"model_id": wanted, "backbone": meta["backbone"],
                                       "stamps": {k: stamps[k] for k in kept}})
    dropped = 0 if stored is None or recomputed else len(set(stored.keys) - set(keys))
    counts = {"embedded": len(new_keys), "reused": len(kept) - len(new_keys), "dropped": dropped,
              "recomputed": recomputed}
    return load_features(path), counts


def _stored_or_none(path):
    """The store at ``path``; None (with a warning) when only its matrix is usable: a missing or stale sidecar."""
    try:
        return load_features(path, mmap=False)
    except (FileNotFoundError, ValueError, KeyError) as err:
        reason = err
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        is_matrix = matrix.ndim == 2 and matrix.dtype == np.float32
    except (OSError, ValueError):
        is_matrix = False
    if not is_matrix:
        raise ValueError(f"{path}: not a features store ({reason}); delete it or pick another path")
    logger.warning("%s: its sidecar %s is missing or stale (an interrupted save?): rebuilding the store",
                   path, sidecar_path(path))
    return None


@dataclass
class Features:
    """Stored features with dict-like access by key.

    Attributes
    ----------
    keys : list of str
    matrix : ndarray of shape (N, D), float32 (memory-mapped read-only by default)
    meta : dict
        The sidecar without its key list: ``model_id``, ``backbone``, ``dim`` ...
    """

    keys: list
    matrix: np.ndarray
    meta: dict
    _index: dict = field(default=None, repr=False)

    @property
    def index(self):
        """``{key: row}``."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.keys)}
        return self._index

    def __getitem__(self, key):
        """The (D,) float32 vector of one image."""
        try:
            return self.matrix[self.index[key]]
        except KeyError:
            raise KeyError(f"no features for {key!r}") from None

    def __contains__(self, key):
        return key in self.index

    def __len__(self):
        return len(self.keys)

    def rows(self, keys):
        """The (len(keys), D) float32 matrix of these images, in this order."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise KeyError(f"no features for {len(missing)} key(s), e.g. {missing[:3]}")
        return np.asarray(self.matrix[[self.index[k] for k in keys]])


def load_features(path, mmap=True):
    """Read features written by :func:`save_features` or :func:`featurize_to_file`.

    Raises
    ------
    FileNotFoundError
        When the ``.npy`` or its sidecar is missing (the sidecar is written last: its absence means an unfinished run).
    ValueError
        When the two disagree (row count, dim) or the matrix is not a float32 (N, D) array.
    """
    path = Path(path)
    side = sidecar_path(path)
    for required in (path, side):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found (features incomplete: run the featurization again)")
    meta = load_json(side)
    matrix = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    keys = meta.pop("keys")
    if matrix.ndim != 2 or matrix.dtype != np.float32:
        raise ValueError(f"{path}: expected a float32 (N, D) matrix, got {matrix.dtype} {matrix.shape}")
    if matrix.shape[0] != len(keys) or matrix.shape[1] != meta.get("dim"):
        raise ValueError(f"{path} has {matrix.shape[0]} rows of {matrix.shape[1]} but {side} lists {len(keys)} keys "
                         f"of dim {meta.get('dim')}: the two files do not belong together")
    return Features(keys, matrix, meta)
