"""Near-duplicate detection with perceptual hashes (in the style of imagededup's hashing methods).

Every image is hashed once (:func:`hash_images`, a plain dict keyed like the rest of the pipeline), then images
whose hashes differ in at most ``max_distance`` bits are linked, and each connected group of linked images is one
group of near-duplicates (:func:`find_near_duplicate_groups`). :func:`kept_key` names the image kept per group and
:func:`duplicates_to_remove` the others.

Run on any folder to see its groups::

    python -m image_similarity.dedup FOLDER [--hash-size 16] [--max-distance 10] [--method dhash]
"""
import argparse
import logging
from pathlib import Path

import imagehash
import numpy as np
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import radius_neighbors_graph
from tqdm import tqdm

from .images import SkippedImages, image_key, list_images, load_image

__all__ = ["HASH_METHODS", "hash_images", "find_near_duplicate_groups", "kept_key", "duplicates_to_remove"]

logger = logging.getLogger(__name__)

# One driver (hash_images) for every variant; each variant is only its formula, all from imagehash.
HASH_METHODS = {
    "dhash": imagehash.dhash,          # horizontal gradient signs: robust to resizing and recompression
    "phash": imagehash.phash,          # low DCT frequencies
    "ahash": imagehash.average_hash,   # above or below the mean grey level
}


def hash_images(sources, root=None, hash_size=16, skipped=None, method="dhash", progress=True):
    """Perceptual hash of every readable image.

    Parameters
    ----------
    sources : iterable of str or Path
        Image paths, or keys relative to ``root`` (a relative source that is not already under ``root`` is read
        from ``root / source``).
    root : str or Path, optional
        The image folder. Relative sources are read from it and every result is keyed by its path relative to it
        ('label/file.jpg'); without it, sources are keyed by ``str(path)``.
    hash_size : int
        Side of the hash grid: the hash has ``hash_size**2`` bits.
    skipped : SkippedImages, optional
        Unreadable images are recorded here (and logged), never raised.
    method : str
        A name in :data:`HASH_METHODS`.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict of str to imagehash.ImageHash
        One entry per readable image, in input order.
    """
    if method not in HASH_METHODS:
        raise ValueError(f"unknown hash method {method!r}; choose one of {', '.join(HASH_METHODS)}")
    if not isinstance(hash_size, int) or hash_size < 2:
        raise ValueError(f"hash_size must be an integer >= 2, got {hash_size!r}")
    hash_func = HASH_METHODS[method]
    sources = list(sources)
    hashes = {}
    for source in tqdm(sources, desc=f"hashing ({method})", unit="img", disable=not progress):
        path = Path(source)
        if root is not None and not path.is_absolute() and not path.is_relative_to(root):
            path = Path(root) / path
        img = load_image(path, skipped)
        if img is not None:
            hashes[image_key(path, root) if root is not None else str(source)] = hash_func(img, hash_size=hash_size)
    return hashes


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
        Connected groups of two or more keys (A~B and B~C puts A, B, C together even when A and C are further
        apart); each group sorted, groups sorted by their first key.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0 bits, got {max_distance}")
    keys = list(hashes)
    if len(keys) < 2:
        return []
    bits = np.array([hashes[k].hash.ravel() for k in keys], dtype=bool)
    n_bits = bits.shape[1]
    # sklearn's hamming metric is the fraction of differing bits; distances are multiples of 1/n_bits,
    # so half a bit of margin makes "at most max_distance bits" exact despite rounding.
    graph = radius_neighbors_graph(bits, radius=(max_distance + 0.5) / n_bits, metric="hamming",
                                   include_self=False)
    _, component = connected_components(graph, directed=False)
    members = {}
    for key, comp in zip(keys, component):
        members.setdefault(comp, []).append(key)
    return sorted(sorted(group) for group in members.values() if len(group) > 1)


def kept_key(group):
    """The image kept from a group of near-duplicates: the first key in sort order."""
    return min(group)


def duplicates_to_remove(groups):
    """Every key of every group except the kept one, sorted."""
    return sorted(key for group in groups for key in group if key != kept_key(group))


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m image_similarity.dedup",
                                     description="Print the groups of near-duplicate images in a folder.")
    parser.add_argument("folder", type=Path, help="folder searched recursively for images")
    parser.add_argument("--hash-size", type=int, default=16, help="hash grid side; hash_size**2 bits (default 16)")
    parser.add_argument("--max-distance", type=int, default=10,
                        help="largest Hamming distance in bits between near-duplicates (default 10)")
    parser.add_argument("--method", choices=sorted(HASH_METHODS), default="dhash", help="hash (default dhash)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    skipped = SkippedImages()
    paths = list_images(args.folder, skipped=skipped)
    hashes = hash_images(paths, root=args.folder, hash_size=args.hash_size, skipped=skipped, method=args.method)
    groups = find_near_duplicate_groups(hashes, args.max_distance)
    for number, group in enumerate(groups, 1):
        print(f"group {number}: " + ", ".join(f"{key} (kept)" if key == kept_key(group) else key for key in group))
    print(f"{len(groups)} group(s) of near-duplicates in {len(hashes)} image(s) under {args.folder}; "
          f"{len(duplicates_to_remove(groups))} would be removed" + (f"; {skipped.summary()}" if skipped else ""))


if __name__ == "__main__":
    _main()
