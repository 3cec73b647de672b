"""image_similarity.apps.scaleout and A5_featurizeWithRay.py on a real local Ray instance (skipped when Ray is absent)."""
import shutil

import numpy as np
import pytest

from image_similarity.data import images
from image_similarity.apps import scaleout
from image_similarity.models.embedder import load_embedder
from image_similarity.data.features import load_features
from conftest import run_script

ray = pytest.importorskip("ray", reason="Ray is an optional dependency: pip install .[scale]")

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on 2 CPUs for the whole module; yields its address."""
    assert scaleout.init_ray(num_cpus=2) == "local"
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, sample_dir):
    """data/photos/<label>/: 10 sample photos from each of 2 labels, plus a corrupt JPEG."""
    root = tmp_path_factory.mktemp("work") / "data" / "photos"
    for label in ("can", "carton"):
        (root / label).mkdir(parents=True)
        for path in images.list_images(sample_dir / label)[:10]:
            shutil.copy(path, root / label / path.name)
    (root / "carton" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def single_process(photo_dir):
    skipped = images.SkippedImages()
    keys, matrix = load_embedder(MODEL).embed_files(images.list_images(photo_dir), photo_dir, batch_size=8,
                                                    n_workers=0, skipped=skipped)
    return keys, matrix, skipped


def test_ray_features_equal_single_process(local_ray, photo_dir, single_process):
    paths = images.list_images(photo_dir)
    skipped = images.SkippedImages()
    keys, matrix, info = scaleout.featurize_ray(paths, photo_dir, MODEL, batch_size=4, skipped=skipped)
    ref_keys, ref_matrix, ref_skipped = single_process
    assert len(paths) == 21 and len(keys) == 20
    assert keys == ref_keys == sorted(keys) and keys[0] == "can/" + paths[0].name
    assert matrix.dtype == np.float32 and matrix.shape == (20, 1280)
    np.testing.assert_allclose(matrix, ref_matrix, atol=1e-5, rtol=0)
    broken = str(photo_dir / "carton" / "broken.jpg")
    assert list(skipped.items) == [broken] == list(ref_skipped.items)
    assert "not an image" in skipped.items[broken] or "corrupt" in skipped.items[broken]
    assert info["model_id"] == f"pretrained:{MODEL}" and info["dim"] == 1280 and info["n_actors"] == 2


@pytest.mark.slow  # about 45 s on 2 shared cores: a second driver process connects and starts its own actors
def test_script_on_cluster_address_writes_step3_format(local_ray, photo_dir, single_process, tmp_path):
    """RAY_ADDRESS points the script at a running cluster (here the module's local instance)."""
    out = tmp_path / "ray_features.npy"
    result = run_script("A5_featurizeWithRay.py", "--dir", photo_dir, "--out", out, "--set", f"workDir={tmp_path}",
                        "--set", "datasetName=photos", "--set", "rf_maxEpochs=0", "--set", "run_mbSize=8",
                        env={"RAY_ADDRESS": local_ray})
    assert result.returncode == 0, result.stderr
    assert f"on Ray ({local_ray})" in result.stdout and "Done: 20 feature vectors" in result.stdout
    stored = load_features(out)
    ref_keys, ref_matrix, _ = single_process
    assert stored.keys == ref_keys
    assert stored.meta["model_id"] == f"pretrained:{MODEL}" and stored.meta["backbone"] == MODEL
    np.testing.assert_allclose(stored.matrix, ref_matrix, atol=1e-5, rtol=0)
    skipped_tsv = (tmp_path / "results" / "photos" / "skipped_images.tsv").read_text()
    assert "broken.jpg" in skipped_tsv and "broken.jpg" in result.stderr


def test_script_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("A5_featurizeWithRay.py", "--dir", tmp_path / "empty", "--set", f"workDir={tmp_path}",
                        "--set", "rf_maxEpochs=0", env={"RAY_ADDRESS": ""})
    assert result.returncode == 2 and "no images in" in result.stderr
    assert not list(tmp_path.rglob("*.npy"))
