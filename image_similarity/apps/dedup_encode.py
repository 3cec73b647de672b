"""Near-duplicates, part 1: encode images as perceptual hashes or CNN features, streamed to an ``.npy`` + ``.json``.

:func:`encode` reads every image once and streams its encoding into an ``.npy`` with a JSON sidecar (keys and
settings): packed bits for the hashes of :data:`HASH_METHODS`, float32 features of the project's network for
``'cnn'``. With ``invariant=True`` it also encodes the image's flips and quarter turns (:data:`VIEWS`).
:mod:`.dedup` searches the encodings for near-duplicates.
"""
import copy
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.fileio import atomic_path, load_json, save_json
from ..data.images import image_key, load_image

__all__ = ["HASH_METHODS", "METHODS", "DEFAULT_THRESHOLDS", "DEFAULT_MODEL", "VIEWS", "HASH_SIZES", "Encodings",
           "encode", "load_encodings", "check_settings"]

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
# Sane hash grid sides: 2x2 = 4 bits up to 64x64 = 4,096 bits (16 gives 256 bits, the default; larger sides only cost
# time: --hash-size 100000 once hashed for minutes without finishing one image).
HASH_SIZES = range(2, 65)


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


def check_settings(method, hash_size, threshold=None):
    """Raise ValueError, in one line naming the value and the allowed range, for settings :func:`encode` and
    :func:`.dedup.find_duplicates` would refuse (or spend minutes on) later.

    Parameters
    ----------
    method : str
    hash_size : int
        Hash grid side (hash methods only).
    threshold : int or float, optional
        Hamming bits (0 .. hash_size**2) for hashes, cosine distance in [0, 2] for ``'cnn'``; None = the default.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "cnn":
        if isinstance(hash_size, bool) or not isinstance(hash_size, int) or hash_size not in HASH_SIZES:
            raise ValueError(f"hash_size must be an integer in {HASH_SIZES.start}..{HASH_SIZES.stop - 1}, "
                             f"got {hash_size!r}")
        if method == "whash" and hash_size & (hash_size - 1):
            raise ValueError(f"whash needs a power-of-2 hash_size, got {hash_size}")
    if threshold is None:
        return
    if method == "cnn" and not 0 <= threshold <= 2:
        raise ValueError(f"threshold for 'cnn' is a cosine distance in [0, 2], got {threshold!r}")
    if method != "cnn" and (threshold != int(threshold) or not 0 <= threshold <= hash_size ** 2):
        raise ValueError(f"threshold for {method} is a whole number of bits in 0..{hash_size ** 2}, got {threshold!r}")


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
    check_settings(method, hash_size)
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

