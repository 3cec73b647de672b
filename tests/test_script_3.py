"""3_featurizeImages.py run as a subprocess on a generated dataset."""
import numpy as np
import pytest

from conftest import run_script
from image_similarity.models import backbones
from image_similarity.models.checkpoints import save_checkpoint
from image_similarity.models.heads import ImageClassifier
from image_similarity.data import features, fileio

SCRIPT = "3_featurizeImages.py"


def _run(work_dir, *overrides):
    sets = [arg for text in (f"workDir={work_dir}", "datasetName=tiny", *overrides) for arg in ("--set", text)]
    return run_script(SCRIPT, *sets, timeout=600)


@pytest.fixture
def dataset(tiny_dataset):
    (tiny_dataset / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return tiny_dataset


def test_pretrained_features_are_written_and_deterministic(dataset):
    work = dataset.parents[1]
    result = _run(work, "rf_maxEpochs=0", "run_mbSize=7")
    assert result.returncode == 0, result.stderr
    out = work / "proc" / "tiny" / "features.npy"
    stored = features.load_features(out)
    assert stored.matrix.shape == (24, 1280) and stored.keys[0] == "blue/blue_0.jpg" and "red/broken.jpg" not in stored
    assert stored.meta["model_id"] == "pretrained:efficientnet_lite0" and stored.meta["dim"] == 1280
    assert np.isfinite(stored.matrix).all()
    rows = fileio.read_tsv(work / "results" / "tiny" / "skipped_images.tsv")
    assert [row[0] for row in rows[1:]] == [str(dataset / "red" / "broken.jpg")]
    assert "Featurized 24 of 25 images" in result.stdout and "1 image(s) skipped" in result.stdout.splitlines()[-1]
    assert "broken.jpg" in result.stderr
    first = out.read_bytes()
    again = _run(work, "rf_maxEpochs=0", "run_mbSize=7", "run_nrWorkers=0")
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == first  # same model, same images: bit-identical


def test_refined_model_is_used(dataset, tmp_path):
    work = dataset.parents[1]
    model = ImageClassifier(backbones.create_model("efficientnet_lite0"), 3)
    path = save_checkpoint(work / "proc" / "tiny" / "model.pt", model, "efficientnet_lite0", ["blue", "green", "red"],
                           backbones.get_backbone("efficientnet_lite0").data_config(96))
    result = _run(work, "rf_maxEpochs=2")
    assert result.returncode == 0, result.stderr
    stored = features.load_features(work / "proc" / "tiny" / "features.npy")
    assert stored.meta["model_id"] == backbones.model_id(path) and "96 px" in result.stdout
    assert stored.matrix.shape == (24, 1280)


def test_bad_batch_settings_are_refused_before_the_outputs_are_touched(dataset):
    work = dataset.parents[1]
    assert _run(work, "rf_maxEpochs=0").returncode == 0
    out = work / "proc" / "tiny" / "features.npy"
    before = {p: p.read_bytes() for p in (out, features.sidecar_path(out))}
    for knob, text in (("run_mbSize=0", "run_mbSize must be an integer >= 1, got 0"),
                       ("run_nrWorkers=-1", "run_nrWorkers must be an integer >= 0, got -1"),
                       ("run_mbSize=2.5", "run_mbSize must be an integer >= 1, got 2.5")):
        result = _run(work, "rf_maxEpochs=0", knob)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {text}"], result.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_missing_model_is_a_one_line_error(dataset):
    result = _run(dataset.parents[1], "rf_maxEpochs=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {dataset.parents[1] / 'proc' / 'tiny' / 'model.pt'} not found: run 2_refineDNN.py first"]
    assert not (dataset.parents[1] / "proc" / "tiny" / "features.npy").exists()


def test_include_labels_limits_the_images(tiny_dataset):
    work = tiny_dataset.parents[1]
    result = _run(work, "rf_maxEpochs=0", "includeLabels=['red', 'blue']", "run_nrWorkers=0")
    assert result.returncode == 0, result.stderr
    stored = features.load_features(work / "proc" / "tiny" / "features.npy")
    assert {key.split("/")[0] for key in stored.keys} == {"red", "blue"} and len(stored) == 16
    result = _run(work, "rf_maxEpochs=0", "includeLabels=['purple']")
    assert result.returncode == 2 and "includeLabels ['purple'] not found" in result.stderr
