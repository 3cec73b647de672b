"""Batched featurization from files, skipped images, and the features store."""
import json

import numpy as np
import pytest
import torch

from conftest import SAMPLE_DIR, make_image
from image_similarity import backbones, features
from image_similarity.fileio import save_npy
from image_similarity.images import SkippedImages, image_key, read_image


@pytest.fixture(scope="module")
def embedder():
    return backbones.load_embedder("efficientnet_lite0")


@pytest.fixture
def folder(tmp_path):
    """5 real photos (two labels) and 2 generated images, plus a corrupt file and an empty one."""
    root = tmp_path / "imgs"
    for label in ("can", "carton"):
        for src in sorted((SAMPLE_DIR / label).glob("*.jpg"))[:2]:
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / src.name).write_bytes(src.read_bytes())
    make_image(root / "gen" / "a.png", (200, 30, 30), pattern="stripes")
    make_image(root / "gen" / "b.jpg", (30, 40, 200), pattern="dots", size=(90, 60))
    (root / "gen" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "gen" / "empty.png").write_bytes(b"")
    return root


def _good(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("corrupt.jpg", "empty.png"))


def test_featurize_skips_and_names_bad_images(folder, embedder):
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    skipped = SkippedImages()
    keys, matrix = features.featurize(paths, folder, embedder, batch_size=3, n_workers=2, skipped=skipped)
    assert keys == [image_key(p, folder) for p in _good(folder)]  # 8 files in, 6 vectors out, input order kept
    assert matrix.shape == (6, 1280) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert sorted(skipped.items) == [str(folder / "gen" / "corrupt.jpg"), str(folder / "gen" / "empty.png")]
    assert "empty" in skipped.items[str(folder / "gen" / "empty.png")]


def test_all_bad_batch_survives(folder, embedder):
    """With batches of 2, [corrupt, empty] is a batch with no readable image: it is skipped, not fatal."""
    paths = [folder / "gen" / "corrupt.jpg", folder / "gen" / "empty.png", folder / "gen" / "a.png"]
    skipped = SkippedImages()
    keys, matrix = features.featurize(paths, folder, embedder, batch_size=2, n_workers=0, skipped=skipped)
    assert keys == ["gen/a.png"] and matrix.shape == (1, 1280) and len(skipped) == 2
    keys, matrix = features.featurize(paths[:2], folder, embedder, batch_size=2, n_workers=0)
    assert keys == [] and matrix.shape == (0, 1280)


def test_batched_equals_unbatched_and_the_plain_forward(folder, embedder):
    paths = _good(folder)
    _, batched = features.featurize(paths, folder, embedder, batch_size=4, n_workers=2)
    _, single = features.featurize(paths, folder, embedder, batch_size=1, n_workers=0)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    net, transform, _ = backbones.load_embedder("efficientnet_lite0")
    with torch.inference_mode():
        plain = net(transform(read_image(paths[0]))[None])[0].numpy()
    np.testing.assert_allclose(batched[0], plain, atol=1e-4)


def test_features_are_deterministic(folder, embedder):
    paths = _good(folder)
    _, a = features.featurize(paths, folder, embedder, batch_size=4, n_workers=0)
    _, b = features.featurize(paths, folder, embedder, batch_size=4, n_workers=2)
    assert a.tobytes() == b.tobytes()


def test_featurize_to_file_streams_and_round_trips(folder, embedder, tmp_path):
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    out = tmp_path / "proc" / "features.npy"
    skipped = SkippedImages()
    stored = features.featurize_to_file(paths, folder, embedder, out, batch_size=3, n_workers=0, skipped=skipped)
    keys, matrix = features.featurize(paths, folder, embedder, batch_size=3, n_workers=0)
    assert len(skipped) == 2 and stored.keys == keys
    assert isinstance(stored.matrix, np.memmap) and stored.matrix.shape == (6, 1280)
    assert stored.matrix.tobytes() == matrix.tobytes()
    assert stored.meta == {"model_id": "pretrained:efficientnet_lite0", "backbone": "efficientnet_lite0",
                           "dim": 1280, "n_images": 6}
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.json", "features.npy"]  # no temporaries
    reloaded = np.load(out)  # the rewritten header is a valid .npy
    assert reloaded.shape == (6, 1280)


def test_save_load_round_trip_and_dict_access(tmp_path):
    rng = np.random.default_rng(0)
    keys = ["a/1.jpg", "a/2.jpg", "b/1.jpg"]
    matrix = rng.normal(size=(3, 4)).astype(np.float64)  # stored as float32
    path = features.save_features(tmp_path / "f.npy", keys, matrix, {"model_id": "pretrained:x", "backbone": "x"})
    side = json.loads((tmp_path / "f.json").read_text())
    assert side["keys"] == keys and side["dim"] == 4 and side["model_id"] == "pretrained:x"
    f = features.load_features(path)
    assert isinstance(f.matrix, np.memmap) and f.matrix.dtype == np.float32
    assert len(f) == 3 and "b/1.jpg" in f and "c/1.jpg" not in f
    np.testing.assert_array_equal(f["a/2.jpg"], matrix[1].astype(np.float32))
    np.testing.assert_array_equal(f.rows(["b/1.jpg", "a/1.jpg"]), matrix[[2, 0]].astype(np.float32))
    with pytest.raises(KeyError, match="c/1.jpg"):
        f.rows(["c/1.jpg"])
    in_ram = features.load_features(path, mmap=False)
    assert not isinstance(in_ram.matrix, np.memmap) and in_ram.keys == keys


def test_mismatched_or_incomplete_store_is_refused(tmp_path):
    meta = {"model_id": "pretrained:x", "backbone": "x"}
    path = features.save_features(tmp_path / "f.npy", ["a", "b"], np.zeros((2, 3)), meta)
    save_npy(path, np.zeros((5, 3), np.float32))  # a newer run's matrix with the old sidecar
    with pytest.raises(ValueError, match="5 rows .* lists 2 keys"):
        features.load_features(path)
    features.sidecar_path(path).unlink()  # an interrupted run: the sidecar comes last
    with pytest.raises(FileNotFoundError, match="f.json"):
        features.load_features(path)
    with pytest.raises(ValueError, match="3 keys"):
        features.save_features(path, ["a", "b", "c"], np.zeros((2, 3)), meta)
    with pytest.raises(ValueError, match="model_id"):
        features.save_features(path, ["a"], np.zeros((1, 3)), {"backbone": "x"})
