"""The features store: streamed from an embedder, saved, loaded, refused when incomplete."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
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


def test_update_features_rebuilds_a_store_left_without_its_sidecar(folder, tmp_path, caplog):
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    out = tmp_path / "run.npy"
    first, _ = features.update_features(paths, folder, out, "efficientnet_lite0", batch_size=4, n_workers=0)
    expected = np.asarray(first.matrix).copy()
    features.sidecar_path(out).unlink()  # what a kill between the two renames (or a full disk) once left
    with caplog.at_level("WARNING"):
        rebuilt, counts = features.update_features(paths, folder, out, "efficientnet_lite0", batch_size=4,
                                                   n_workers=0)
    assert f"{out}: its sidecar {features.sidecar_path(out)} is missing or stale" in caplog.text
    assert counts["embedded"] == len(first) and rebuilt.keys == first.keys
    np.testing.assert_array_equal(rebuilt.matrix, expected)
    # A stale sidecar (another run's keys) is rebuilt too; a file that is no matrix at all is still refused.
    save_npy(out, np.zeros((2, 1280), np.float32))
    assert features.update_features(paths, folder, out, "efficientnet_lite0", n_workers=0)[1]["embedded"] == 6
    out.write_bytes(b"someone's notes")
    features.sidecar_path(out).unlink()
    with pytest.raises(ValueError, match="not a features store"):
        features.update_features(paths, folder, out, "efficientnet_lite0", n_workers=0)


FULL_DISK_CHILD = """
import resource, signal, sys
import numpy as np
from image_similarity.data import features
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # writes past 64 KiB fail, like a full disk
try:
    features.save_features(sys.argv[1], [str(i) for i in range(1000)], np.ones((1000, 100)),
                           {"model_id": "pretrained:x", "backbone": "x"})
except OSError as err:
    print(err)
"""


def test_a_full_disk_while_saving_keeps_the_earlier_store_and_names_the_file(tmp_path):
    meta = {"model_id": "pretrained:x", "backbone": "x"}
    path = features.save_features(tmp_path / "f.npy", ["a", "b"], np.eye(2, 3), meta)
    result = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(path)], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.stdout.startswith(f"{path}: cannot write: "), result.stdout + result.stderr
    kept = features.load_features(path)
    assert kept.keys == ["a", "b"] and np.array_equal(kept.matrix, np.eye(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "f.npy"]
