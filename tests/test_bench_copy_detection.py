"""bench/copy_detection.py: the transformed copies are deterministic, different per seed, and within the ranges."""
import sys

import numpy as np
from PIL import Image

from conftest import REPO
from image_similarity.data.images import read_image

sys.path.insert(0, str(REPO / "bench"))
import copy_detection  # noqa: E402


def test_copies_are_deterministic_and_transformed(sample_dir, tmp_path):
    keys = sorted(p.relative_to(sample_dir).as_posix() for p in sample_dir.rglob("*.jpg"))[:3]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        (tmp_path / name).mkdir()
        copies = copy_detection.make_copies(sample_dir, keys, 2, tmp_path / name, seed=seed)
        assert [key for _, key in copies] == [k for k in keys for _ in range(2)]
        runs[name] = [np.asarray(Image.open(path)) for path, _ in copies]
    assert all(np.array_equal(x, y) for x, y in zip(runs["a"], runs["b"]))  # same seed: the same pixels
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(runs["a"], runs["c"]))
    assert not np.array_equal(runs["a"][0], runs["a"][1])  # two copies of one image differ
    # Only this image's key seeds its copies: dropping the others does not change them.
    (tmp_path / "d").mkdir()
    alone = copy_detection.make_copies(sample_dir, keys[1:2], 2, tmp_path / "d", seed=0)
    assert np.array_equal(np.asarray(Image.open(alone[0][0])), runs["a"][2])
    for key, copy in zip([k for k in keys for _ in range(2)], runs["a"]):
        original = read_image(sample_dir / key)
        assert copy.ndim == 3 and copy.shape[2] == 3
        # crop 60-90% of each side, then rescale 0.5-1.25: at most 1.125 and at least 0.3 of the original side
        for axis, side in ((1, original.width), (0, original.height)):
            assert 0.3 * side - 1 <= copy.shape[axis] <= 1.125 * side + 1


def test_ranks_of_originals_by_hand():
    distances = np.array([[0.3, 0.1, 0.2], [0.0, 0.5, 0.5]])
    ranks = copy_detection.ranks_of_originals(distances, ["x", "y"], ["x", "y", "z"])
    assert ranks.tolist() == [3, 3]  # x is farthest for the first; y ties z (pessimistic) behind x for the second
    assert copy_detection.summary(ranks, 0.5) == {"recall@1": 0.0, "recall@10": 1.0, "map": 1 / 3, "n_queries": 2,
                                                  "ms_per_query": 250.0}
