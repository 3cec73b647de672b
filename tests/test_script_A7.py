"""A7_embeddingMap.py and image_similarity.apps.embedding_map: the map of a small real run, and of any store."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_labelled_images, run_script
from image_similarity.apps import embedding_map
from image_similarity.data.fileio import save_csv


def _args(work):
    return ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "run_nrWorkers=0", "--set", "map_method='tsne'"]


@pytest.fixture(scope="module")
def featurized(tmp_path_factory):
    """3 labels x 10 generated images through steps 1 and 3 (the pretrained network)."""
    work = tmp_path_factory.mktemp("map")
    make_labelled_images(work / "data" / "tiny", 10)
    for step in ("1_prepareData.py", "3_featurizeImages.py"):
        result = run_script(step, *_args(work))
        assert result.returncode == 0, f"{step}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return work


def test_map_of_a_run_marks_label_issues_and_near_duplicates(featurized):
    work = featurized
    keys = json.loads((work / "proc" / "tiny" / "features.json").read_text())["keys"]
    results = work / "results" / "tiny"
    save_csv(results / "label_issues.csv", ["rank", "key", "flagged"], [[1, keys[4], "yes"], [2, keys[5], "no"]])
    save_csv(results / "near_duplicates.csv", ["group", "key", "kept"],
             [[1, keys[0], "yes"], [1, keys[1], "no"], [1, "gone/x.jpg", "no"]])
    result = run_script("A7_embeddingMap.py", *_args(work))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done: 30 images in 3 label(s) mapped with tsne; 1 label issue(s), 1 near-duplicate link(s)" in result.stdout
    document = json.loads((work / "proc" / "tiny" / "embedding_map.json").read_text())
    points = document["points"]
    assert [p["key"] for p in points] == keys and [p["id"] for p in points] == list(range(30))
    assert [p["key"] for p in points if p["suspect"]] == [keys[4]] and document["duplicate_pairs"] == [[0, 1]]
    assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in points)
    with Image.open(results / "embedding_map.png") as png:
        assert png.size == (1200, 1000)
    # Labels that look alike land together: each image's nearest point on the map mostly shares its label.
    xy = np.array([[p["x"], p["y"]] for p in points])
    gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) + np.eye(len(xy)) * 9
    labels = [p["label"] for p in points]
    assert np.mean([labels[i] == labels[j] for i, j in enumerate(gaps.argmin(1))]) >= 0.8


def test_map_of_any_store_is_written_beside_it(featurized, tmp_path):
    store = featurized / "proc" / "tiny" / "features.npy"
    result = run_script("A7_embeddingMap.py", *_args(featurized), "--features", str(store), "--set",
                        "map_maxThumbnails=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (store.parent / "features_map.json").is_file() and (store.parent / "features_map.png").is_file()


@pytest.mark.parametrize("extra, word", [(["--set", "map_method='pca'"], "map_method"),
                                         (["--features", "nowhere.npy"], "nowhere.npy")])
def test_bad_arguments_are_one_line(featurized, extra, word):
    result = run_script("A7_embeddingMap.py", *_args(featurized), *extra)
    assert result.returncode == 2 and word in result.stderr and "Traceback" not in result.stderr


def test_umap_and_tsne_keep_two_far_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 64))
    matrix = np.concatenate([c + 0.05 * rng.normal(size=(20, 64)) for c in centres]).astype(np.float32)
    for method in ("umap", "tsne"):
        coords, used = embedding_map.project_2d(matrix, method)
        assert used == method and coords.shape == (40, 2) and coords.min() >= 0 and coords.max() <= 1
        a, b = coords[:20].mean(0), coords[20:].mean(0)
        spread = max(coords[:20].std(0).max(), coords[20:].std(0).max())
        assert np.linalg.norm(a - b) > 4 * spread, method
    again, _ = embedding_map.project_2d(matrix, "tsne")
    assert np.array_equal(again, embedding_map.project_2d(matrix, "tsne")[0])  # seeded: the same map each time
    with pytest.raises(ValueError, match="at least 3"):
        embedding_map.project_2d(matrix[:2])
