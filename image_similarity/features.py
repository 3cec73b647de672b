"""Batched featurization of image files, and the features store (a float32 .npy plus a JSON sidecar).

Images are decoded, resized and cropped in DataLoader workers through :func:`images.load_image`, which send uint8
pixels; each batch is normalised in this process just before the forward pass. A bad file is skipped, named and
counted once, and a batch in which every image is bad is simply empty. Features can be streamed straight into the
``.npy`` file, so a million images never need their matrix in memory.
"""
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backbones import load_embedder
from .fileio import atomic_path, load_json, save_json, save_npy
from .images import SkippedImages, image_key, load_image

__all__ = ["ImageFileDataset", "iter_features", "featurize", "featurize_to_file", "save_features", "load_features",
           "Features", "sidecar_path"]

logger = logging.getLogger(__name__)


class ImageFileDataset(Dataset):
    """Image files as ``(index, tensor or None, reason or None)``; unreadable files give ``None`` and the reason.

    Parameters
    ----------
    paths : list of Path
    transform : callable
        PIL RGB image -> tensor of shape (3, r, r), e.g. ``EvalTransform.to_uint8``.
    """

    def __init__(self, paths, transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        local = SkippedImages()  # workers are separate processes: the reason travels back with the item
        image = load_image(self.paths[index], local)
        if image is None:
            return index, None, next(iter(local))[1]
        return index, self.transform(image), None


def _collate(items):
    """Stack the readable images; bad ones travel as ``(index, reason)``. An all-bad batch gives ``None``."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


@contextmanager
def _cpu_threads():
    """Use as many intra-op threads as this process may run on (torch counts all cores of the host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, len(os.sched_getaffinity(0)))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _embedder(model, device):
    if isinstance(model, (str, os.PathLike)):
        return load_embedder(model, device)
    return model


def iter_features(paths, root, model, batch_size=64, n_workers=2, skipped=None, device=None):
    """Yield ``(keys, rows)`` batch by batch, in the order of ``paths``, skipping unreadable images.

    Parameters
    ----------
    paths : list of Path
        Image files under ``root``.
    root : Path
        Keys are the paths relative to it, with forward slashes.
    model : str, Path or tuple
        A backbone name, a checkpoint path, or the ``(net, transform, info)`` of ``backbones.load_embedder``.
    batch_size : int
        Images per forward pass.
    n_workers : int
        DataLoader worker processes decoding images (0 = in this process).
    skipped : SkippedImages, optional
        Receives every unreadable file with its reason (one entry per image).
    device : str or torch.device, optional
        Default: CUDA when available (with AMP and pinned memory), else CPU (channels-last).

    Yields
    ------
    (list of str, ndarray of shape (n, D), float32)
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, transform, info = _embedder(model, device)
    net = net.to(device).eval()
    cuda = device.type == "cuda"
    if not cuda:
        net = net.to(memory_format=torch.channels_last)
    paths = [Path(p) for p in paths]
    keys = [image_key(p, root) for p in paths]
    n_batches = -(-len(paths) // batch_size)
    loader = DataLoader(ImageFileDataset(paths, transform.to_uint8), batch_size=batch_size, shuffle=False,
                        num_workers=min(n_workers, n_batches), collate_fn=_collate, pin_memory=cuda)
    n_bad = 0
    with _cpu_threads(), torch.inference_mode(), tqdm(total=len(paths), unit="img", desc="featurize",
                                                      disable=None) as bar:
        for indices, batch, bad in loader:
            for i, reason in bad:
                if skipped is not None:
                    skipped.add(paths[i], reason)
            n_bad += len(bad)
            bar.update(len(indices) + len(bad))
            if batch is None:
                continue
            if cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    out = net(transform.normalize(batch.to(device, non_blocking=True)))
            else:
                out = net(transform.normalize(batch.contiguous(memory_format=torch.channels_last)))
            yield [keys[i] for i in indices], out.float().cpu().numpy()
    logger.info("featurized %d of %d images with %s (%d skipped)", len(paths) - n_bad, len(paths),
                info["model_id"], n_bad)


def featurize(paths, root, model, batch_size=64, n_workers=2, skipped=None, device=None):
    """Embed image files in memory.

    Parameters are those of :func:`iter_features`.

    Returns
    -------
    keys : list of str
        One per readable image, in the order of ``paths``.
    matrix : ndarray of shape (len(keys), D), float32
    """
    model = _embedder(model, device)
    matrix = np.empty((len(paths), model[2]["dim"]), np.float32)
    keys = []
    for batch_keys, rows in iter_features(paths, root, model, batch_size, n_workers, skipped, device):
        matrix[len(keys):len(keys) + len(rows)] = rows
        keys.extend(batch_keys)
    return keys, (matrix if len(keys) == len(paths) else matrix[:len(keys)].copy())


def sidecar_path(path):
    """The JSON beside a features ``.npy``: keys, model_id, backbone, dim."""
    return Path(path).with_suffix(".json")


def _sidecar(keys, dim, meta):
    missing = {"model_id", "backbone"} - set(meta)
    if missing:
        raise ValueError(f"features metadata needs {sorted(missing)}")
    return {**meta, "dim": int(dim), "n_images": len(keys), "keys": list(keys)}


def save_features(path, keys, matrix, meta):
    """Write ``matrix`` (N, D) as float32 ``path`` (.npy), then the sidecar JSON; both atomic.

    The old sidecar is removed first and the new one written last, so an interrupted run is never taken for a
    finished one.

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
    sidecar = _sidecar(keys, matrix.shape[1], meta)
    sidecar_path(path).unlink(missing_ok=True)
    save_npy(path, matrix)
    save_json(sidecar_path(path), sidecar)
    return Path(path)


def featurize_to_file(paths, root, model, path, batch_size=64, n_workers=2, skipped=None, device=None, meta=None):
    """Embed image files straight into ``path`` (.npy, float32) and its sidecar; memory stays flat.

    Rows are appended to a temporary ``.npy`` as batches arrive; the header is fixed up to the number of readable
    images at the end (numpy leaves room for that), then the file is synced and renamed, and the sidecar is written
    last. Parameters are those of :func:`iter_features`, plus ``meta`` (extra sidecar entries).

    Returns
    -------
    Features
        Memory-mapped.
    """
    model = _embedder(model, device)
    info = model[2]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    keys = []
    sidecar_path(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (len(paths), info["dim"])})
        offset = handle.tell()
        for batch_keys, rows in iter_features(paths, root, model, batch_size, n_workers, skipped, device):
            handle.write(np.ascontiguousarray(rows, np.float32).tobytes())
            keys.extend(batch_keys)
        handle.seek(0)
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (len(keys), info["dim"])})
        if handle.tell() != offset:
            raise RuntimeError(f"{path}: the .npy header changed size when rewritten")
        handle.truncate(offset + len(keys) * info["dim"] * 4)
    meta = {"model_id": info["model_id"], "backbone": info["backbone"], **(meta or {})}
    save_json(sidecar_path(path), _sidecar(keys, info["dim"], meta))
    return load_features(path)


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
