"""The features store: streamed from an embedder, saved, loaded, refused when incomplete."""
import json

import numpy as np
import pytest

from image_similarity.data import features
from image_similarity.data.fileio import save_npy
from image_similarity.data.images import SkippedImages
from test_embedder import embedder, folder  # noqa: F401 (fixtures)


def test_featurize_to_file_streams_and_round_trips(folder, embedder, tmp_path):
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    out = tmp_path / "proc" / "features.npy"
    skipped = SkippedImages()
    stored = features.featurize_to_file(paths, folder, embedder, out, batch_size=3, n_workers=0, skipped=skipped)
    keys, matrix = embedder.embed_files(paths, folder, batch_size=3, n_workers=0)
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
