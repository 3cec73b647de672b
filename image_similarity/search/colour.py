"""Plain colour and brightness, which an ImageNet embedding barely sees: a colour histogram beside the embedding.

A network trained to name objects learns to ignore lighting, so noisy white and noisy black images lie within a
cosine distance of a few hundredths of each other. A soft colour histogram tells them apart at once
(:func:`colour_histograms`, unit rows: the inner product of two is 1 for the same colours). :func:`with_colour`
appends it, weighted, to the L2-normalised embedding, so that the cosine distance of the joined vectors is
``(1 - weight) * cosine distance of the embeddings + weight * colour distance`` (one minus the histograms' inner
product): any cosine index searches it unchanged.
"""
import logging
from pathlib import Path

import numpy as np
from sklearn.preprocessing import normalize

from ..data.features import load_features, save_features
from ..data.images import SkippedImages, load_image

__all__ = ["BINS_PER_CHANNEL", "COLOUR_DIM", "colour_histograms", "with_colour", "ColourCosineRanker",
           "file_histograms", "gallery_histograms"]

logger = logging.getLogger(__name__)

BINS_PER_CHANNEL = 4  # anchor colours per RGB channel: 4 x 4 x 4 cells
COLOUR_DIM = BINS_PER_CHANNEL ** 3
SOFTNESS = 0.2        # width of each cell's Gaussian, in units of the 0..1 colour range: nearby colours overlap
POOLED_SIDE = 16      # images are averaged down to 16 x 16 pixels first (noise averages out, and it is cheap)
_ANCHORS = (np.stack(np.meshgrid(*[np.arange(BINS_PER_CHANNEL)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) \
    / BINS_PER_CHANNEL


def colour_histograms(pixels):
    """Soft colour histograms of a batch of images: how much of each image lies near each of 64 anchor colours.

    Each pixel of the image, averaged down to ``POOLED_SIDE`` x ``POOLED_SIDE``, votes for every anchor colour
    with a Gaussian weight of its RGB distance (``SOFTNESS``), so a small change of brightness moves the histogram a
    little, not across a hard cell border, and a plain change of colour or brightness moves it far.

    Parameters
    ----------
    pixels : ndarray or tensor of shape (n, 3, H, W), uint8
        RGB images, channels first (as ``backbones.EvalTransform.to_uint8`` makes them), H and W divisible by
        ``POOLED_SIDE`` or not (the border rows that do not fill a cell are left out).

    Returns
    -------
    ndarray of shape (n, COLOUR_DIM), float32
        Unit L2 rows; the inner product of two is 1 for the same colours and near 0 for unrelated ones.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 array of shape (n, 3, H, W), got {pixels.dtype} {pixels.shape}")
    n, _, height, width = pixels.shape
    side_h, side_w = min(POOLED_SIDE, height), min(POOLED_SIDE, width)
    cropped = pixels[:, :, :height // side_h * side_h, :width // side_w * side_w].astype(np.float32) / 255.0
    pooled = cropped.reshape(n, 3, side_h, height // side_h, side_w, width // side_w).mean(axis=(3, 5))
    colours = pooled.reshape(n, 3, -1).transpose(0, 2, 1)  # (n, pixels, 3)
    squared = ((colours[:, :, None, :] - _ANCHORS[None, None]) ** 2).sum(-1)  # (n, pixels, COLOUR_DIM)
    histograms = np.exp(-squared / (2 * SOFTNESS ** 2)).mean(axis=1)
    return normalize(histograms).astype(np.float32)


def with_colour(embeddings, histograms, weight):
    """Join L2-normalised embeddings and colour histograms so that cosine distance weighs both.

    Parameters
    ----------
    embeddings : ndarray of shape (n, D), float
    histograms : ndarray of shape (n, COLOUR_DIM), float
        From :func:`colour_histograms` (unit rows).
    weight : float
        In [0, 1): the share of the colour distance; 0 gives the embedding alone.

    Returns
    -------
    ndarray of shape (n, D + COLOUR_DIM), float32
        Unit rows: ``[sqrt(1 - weight) * normalize(embeddings), sqrt(weight) * histograms]``.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"the colour weight must be in [0, 1), got {weight!r}")
    embeddings = normalize(np.asarray(embeddings, dtype=np.float32))
    histograms = np.asarray(histograms, dtype=np.float32)
    if histograms.shape != (len(embeddings), COLOUR_DIM):
        raise ValueError(f"need one {COLOUR_DIM}-bin histogram per embedding, got {histograms.shape} for "
                         f"{len(embeddings)} embeddings")
    return np.hstack([np.sqrt(1 - weight) * embeddings, np.sqrt(weight) * histograms]).astype(np.float32)


class ColourCosineRanker:
    """The cosine distance of embeddings joined with colour histograms (:func:`with_colour`): the "cosine+colour"
    ranker, the similarity model's default.

    Its inputs are the rows ``[embedding (D) | colour histogram (COLOUR_DIM)]`` (``core.Gallery`` builds them for
    a ranker whose ``uses_colour`` is true), and the distance is ``(1 - colour_weight) * (1 - cos of the
    embeddings) + colour_weight * (1 - inner product of the histograms)``, in [0, 2], lower is more similar.

    Parameters
    ----------
    colour_weight : float
        In [0, 1): the share of the colour distance.
    """

    uses_colour = True

    def __init__(self, colour_weight=0.3):
        self.colour_weight = colour_weight

    def fit(self, X=None, y=None):
        """Nothing to learn; returns self."""
        return self

    def index_vectors(self, rows):
        """The unit vectors whose cosine distance is this distance, (n, D + COLOUR_DIM) float32."""
        rows = np.asarray(rows, dtype=np.float32)
        return with_colour(rows[:, :-COLOUR_DIM], rows[:, -COLOUR_DIM:], self.colour_weight)

    def distances(self, queries, references):
        """(n_q, n_r) float64 distances between joined rows (n_q, D + COLOUR_DIM) and (n_r, D + COLOUR_DIM)."""
        q, r = self.index_vectors(queries).astype(np.float64), self.index_vectors(references).astype(np.float64)
        return np.clip(1.0 - q @ r.T, 0.0, 2.0)

    def __repr__(self):
        return f"ColourCosineRanker(colour_weight={self.colour_weight})"


def file_histograms(paths, to_uint8, skipped=None, batch_size=64):
    """Colour histograms of image files, computed on the pixels the network sees.

    Parameters
    ----------
    paths : list of Path
    to_uint8 : callable
        PIL RGB image -> uint8 tensor (3, r, r): the embedder's ``transform.to_uint8``, so that a stored image and
        the same image as a query get the same histogram.
    skipped : images.SkippedImages, optional
        Receives the unreadable files.
    batch_size : int

    Returns
    -------
    ndarray of shape (len(paths), COLOUR_DIM), float32
        NaN rows for unreadable files.
    """
    out = np.full((len(paths), COLOUR_DIM), np.nan, np.float32)
    for start in range(0, len(paths), batch_size):
        block = [(i, load_image(paths[i], skipped)) for i in range(start, min(start + batch_size, len(paths)))]
        good = [(i, np.asarray(to_uint8(image))) for i, image in block if image is not None]
        if good:
            out[[i for i, _ in good]] = colour_histograms(np.stack([pixels for _, pixels in good]))
    return out


def gallery_histograms(cache_path, keys, image_dir, to_uint8, model_id):
    """The colour histograms of stored images, read from ``cache_path`` or computed and cached there (atomically).

    The cache is a features store (``features.save_features``) keyed by the images' keys; it is used only when it
    holds exactly ``keys`` and was made for ``model_id`` (whose input size decides the pixels).

    Parameters
    ----------
    cache_path : Path
        E.g. ``features.colours.npy`` beside the features.
    keys : list of str
        Image paths relative to ``image_dir``.
    image_dir : Path
    to_uint8 : callable
        See :func:`file_histograms`.
    model_id : str

    Returns
    -------
    ndarray of shape (len(keys), COLOUR_DIM), float32

    Raises
    ------
    ValueError
        When an image cannot be read (naming it and the reason).
    """
    keys = list(keys)
    try:
        cached = load_features(cache_path, mmap=False)
        if cached.keys == keys and cached.meta.get("model_id") == model_id:
            return cached.matrix
    except (FileNotFoundError, ValueError):
        pass
    skipped = SkippedImages()
    histograms = file_histograms([Path(image_dir) / key for key in keys], to_uint8, skipped)
    if skipped:
        raise ValueError(f"colour histograms under {image_dir}: {skipped.summary()}")
    save_features(cache_path, keys, histograms, {"model_id": model_id, "backbone": "colour histograms"})
    logger.info("computed the colour histograms of %d images into %s", len(keys), cache_path)
    return histograms
