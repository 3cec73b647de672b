"""A1_imageRetrieval.py as a subprocess: a query from outside the data folder, and clean refusals."""
import re

import numpy as np
import pytest
from PIL import Image

from conftest import make_image, make_labelled_images, run_script
from image_similarity.data.splits import load_split


@pytest.fixture(scope="module")
def featurized(tmp_path_factory):
    """A workDir with 3 labels x 8 generated images, split (step 1) and featurized (step 3, pretrained)."""
    work = tmp_path_factory.mktemp("retrieval")
    make_labelled_images(work / "data" / "tiny", 8)
    args = ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "run_nrWorkers=0"]
    for step in ("1_prepareData.py", "3_featurizeImages.py"):
        result = run_script(step, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    return work, args


def test_query_outside_the_data_folder(featurized, tmp_path):
    work, args = featurized
    query = make_image(tmp_path / "elsewhere" / "my query.png", (205, 25, 35), pattern="stripes")
    result = run_script("A1_imageRetrieval.py", query, "--top", "5", "--references", "test", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    ranked = re.findall(r"^\s+(\d+)\.\s+(\S+)\s+(\S+)\s+(.+)$", result.stdout, re.M)
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    distances = [float(r[1]) for r in ranked]
    assert distances == sorted(distances)
    # The test split holds 2 images per label: both red ones come first (red stripes, like the query).
    labels = [label for _, _, label, _ in ranked]
    assert labels[:2] == ["red", "red"] and "red" not in labels[2:], result.stdout
    test_keys = {k for keys in load_split(work / "proc" / "tiny" / "imgFilenamesTest.json").values() for k in keys}
    shown = {path.split("/data/tiny/")[1] for *_, path in ranked}
    assert shown <= test_keys
    assert "(cosine on pretrained:" in result.stdout  # no 5_evaluate.py run yet: the one fallback, cosine
    assert re.search(r"Time: loading [\d.]+ s, network [\d.]+ s, search [\d.]+ s", result.stdout)
    grid = work / "results" / "tiny" / "retrieval_my query_cosine.png"  # the query's stem and the ranker
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size == (1000, 440)  # 5 columns x (query row + 1 row of matches)
        assert np.asarray(img.convert("L")).std() > 10


@pytest.mark.parametrize("make_bad, reason", [(lambda d: d / "missing.jpg", "file not found"),
                                              (lambda d: d / "notes.txt", "not an image")])
def test_missing_or_non_image_file_is_one_line_error(featurized, tmp_path, make_bad, reason):
    _, args = featurized
    (tmp_path / "notes.txt").write_text("this is text, not pixels\n")
    bad = make_bad(tmp_path)
    result = run_script("A1_imageRetrieval.py", bad, *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and bad.name in lines[0] and reason in lines[0], result.stderr


def test_learned_ranker_without_step_4_names_it(featurized, tmp_path):
    _, args = featurized
    query = make_image(tmp_path / "q.jpg", (30, 40, 200))
    result = run_script("A1_imageRetrieval.py", query, "--ranker", "weightedl2", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "4_trainSvm.py" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_attributes_rank_by_combined_probability(featurized, tmp_path):
    work, args = featurized  # runs last in this module: it re-splits and adds step 4's outputs
    args = [*args, "--set", "ratioValFromTrain=0.5"]  # 8 images per label: validation needs a larger share
    for step in ("1_prepareData.py", "4_trainSvm.py"):
        result = run_script(step, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    query = make_image(tmp_path / "q.png", (205, 25, 35), pattern="stripes")
    result = run_script("A1_imageRetrieval.py", query, "--top", "4", "--attributes", "tiny", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(attributes:tiny on pretrained:" in result.stdout
    ranked = re.findall(r"^\s+\d+\.\s+(\S+)\s+(\S+)\s+.+$", result.stdout, re.M)
    assert [label for _, label in ranked][:2] == ["red", "red"]
    assert all(0.0 <= float(d) <= 1.0 for d, _ in ranked)  # 1 - combined probability
    result = run_script("A1_imageRetrieval.py", query, "--attributes", "colour", *args)
    assert result.returncode == 2 and "unknown attribute(s) ['colour']: configured are ['tiny']" in result.stderr


def test_hybrid_is_the_default_once_step_4_ran(featurized, tmp_path):
    """Last in this module: step 4 makes a classifier, and A1 then ranks labels first, looks within a label."""
    work, args = featurized
    step4 = run_script("4_trainSvm.py", *args, "--set", "svm_CValCandidates=[1.0]")
    assert step4.returncode == 0, step4.stderr[-3000:]
    query = make_image(tmp_path / "q.png", (205, 25, 35), pattern="stripes")
    result = run_script("A1_imageRetrieval.py", query, "--top", "8", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(hybrid on pretrained:" in result.stdout
    ranked = re.findall(r"^\s+(\d+)\.\s+(\S+)\s+(\S+)\s+(.+)$", result.stdout, re.M)
    distances = [float(r[1]) for r in ranked]
    # Informative: no column of zeros, no ties left to the file order; the query's label first.
    assert distances == sorted(distances) and len(set(distances)) == 8 and min(distances) > 0, result.stdout
    labels = [label for _, _, label, _ in ranked]
    assert labels[:8] == ["red"] * 8, result.stdout
