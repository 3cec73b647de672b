"""Plain colour and brightness, which an ImageNet embedding barely sees: a colour histogram beside the embedding.

A network trained to name objects learns to ignore lighting, so noisy white and noisy black images lie within a
cosine distance of a few hundredths of each other. A soft colour histogram tells them apart at once
(:func:`colour_histograms`, unit rows: the inner product of two is 1 for the same colours). :func:`with_colour`
appends it, weighted, to the L2-normalised embedding, so that the cosine distance of the joined vectors is
``(1 - weight) * cosine distance of the embeddings + weight * colour distance`` (one minus the histograms' inner
product): any cosine index searches it unchanged.
"""
import numpy as np
from sklearn.preprocessing import normalize

__all__ = ["BINS_PER_CHANNEL", "COLOUR_DIM", "colour_histograms", "with_colour"]

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
