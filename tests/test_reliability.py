"""Bad input, faults and interruptions across the entry points (issue: reliability).

A dataset of small real images is laced with the generated corpus in tests/bad_inputs.py; every entry point must
name each bad file once, skip it, process every good file, and leave nothing half-written.
"""
import csv
import io
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bad_inputs import lace_with_bad_inputs
from conftest import REPO, make_image, make_labelled_images, run_script
from image_similarity.data.images import ImageReadError, read_image

PRETRAINED = ["--set", "rf_maxEpochs=0"]


@pytest.fixture(scope="module")
def laced(tmp_path_factory):
    """A workDir whose data/laced/ holds 3 labels of good images plus the bad-input corpus."""
    work = tmp_path_factory.mktemp("laced")
    root = work / "data" / "laced"
    make_labelled_images(root, 12)  # enough that validation holds every label
    corpus = lace_with_bad_inputs(root, "red", work / "outside")
    good = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name != "Thumbs.db"
                  and p.relative_to(root).as_posix() not in corpus.bad)
    args = ["--set", f"workDir={work}", "--set", "datasetName=laced", "--set", "dedup_enabled=False"]
    return work, root, corpus, good, args


def read_skipped(work):
    with open(work / "results" / "laced" / "skipped_images.tsv", encoding="utf-8") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle, delimiter="\t")}


def assert_bad_files_named_once(corpus, stderr):
    """One warning with the reason per bad file (the closing summary lists them again, without reasons)."""
    for key, why in corpus.bad.items():
        lines = [line for line in stderr.splitlines() if f"{key}: " in line]
        assert len(lines) == 1, f"{key} ({why}) reported {len(lines)} times:\n{stderr[-3000:]}"


def test_corpus_has_at_least_27_cases(laced):
    assert laced[2].n_cases >= 27


def test_odd_but_valid_files_decode_to_the_right_pixels(laced):
    _, root, corpus, _, _ = laced
    for key, expected in corpus.odd_valid.items():
        pixels = np.asarray(read_image(root / key), np.int16)
        assert pixels.shape == expected.shape, key
        assert np.abs(pixels - expected).mean() < 6, f"{key}: wrong pixels or orientation"


def test_bad_files_are_refused_with_path_and_reason(laced):
    _, root, corpus, _, _ = laced
    for key in corpus.bad:
        with pytest.raises(ImageReadError) as info:
            read_image(root / key)
        assert key.split("/")[-1] in str(info.value) and info.value.reason


def test_prepare_data_skips_bad_files_once_and_keeps_every_good_one(laced):
    work, root, corpus, good, args = laced
    result = run_script("1_prepareData.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_bad_files_named_once(corpus, result.stderr)
    skipped = read_skipped(work)
    for key in corpus.bad:
        assert any(path.endswith(key) for path in skipped), f"{key} missing from skipped_images.tsv"
    assert any(path.endswith("link_outside.jpg") for path in skipped)
    for label in corpus.empty_labels:
        assert label in result.stderr, f"no warning about the unusable label {label}"
    from image_similarity.data.splits import load_split
    split_keys = {k for split in ("train", "val", "test")
                  for keys in load_split(work / "proc" / "laced" / f"imgFilenames{split.title()}.json").values()
                  for k in keys}
    assert split_keys == set(good)


def test_featurize_embeds_every_good_file(laced):
    work, root, corpus, good, args = laced
    result = run_script("3_featurizeImages.py", *args, *PRETRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_bad_files_named_once(corpus, result.stderr)
    from image_similarity.data.features import load_features
    features = load_features(work / "proc" / "laced" / "features.npy")
    assert sorted(features.keys) == good
    assert np.isfinite(np.asarray(features.matrix)).all()
    assert set(read_skipped(work)) >= {str(root / key) for key in corpus.bad}


def test_featurize_in_dir_skips_bad_files(laced, tmp_path):
    _, root, corpus, good, _ = laced
    out = tmp_path / "laced.npy"
    result = run_script("A2_featurizeImagesInDir.py", root, "--recursive", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bad_files_named_once(corpus, result.stderr)
    from image_similarity.data.features import load_features
    assert sorted(load_features(out).keys) == good


def test_retrieval_answers_odd_queries_and_refuses_bad_ones(laced):
    work, root, corpus, _, args = laced
    assert (work / "proc" / "laced" / "features.npy").exists(), "runs after the featurize test"
    # One odd query and two bad ones: each A1 run loads the network, so the full list would cost minutes.
    result = run_script("A1_imageRetrieval.py", root / "red" / "cmyk.jpg", "--top", "3", "--ranker", "L2", *args,
                        *PRETRAINED)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("red/truncated.jpg", "red/does_not_exist.jpg"):
        result = run_script("A1_imageRetrieval.py", root / key, "--ranker", "L2", *args, *PRETRAINED)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr and key.split("/")[-1] in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_api_skips_bad_files_with_one_warning_naming_them(laced):
    _, root, corpus, good, _ = laced
    import image_similarity
    with pytest.warns(UserWarning) as caught:
        model = image_similarity.create(root, label="folder", batch_size=16)
    named = " ".join(str(w.message) for w in caught)
    assert all(key.split("/")[-1] in named for key in corpus.bad)
    assert sorted(model.keys) == good
    # Every orientation decodes to the same upright picture, so the nearest references are its twins.
    result = model.query(root / "red" / "exif_orientation_8.jpg", k=3)
    upright_twins = {k for k in corpus.odd_valid if "exif_orientation" in k or k.endswith("photo.jpg") or "/long_" in k}
    assert set(result["reference"]) <= upright_twins and result["distance"].max() < 0.05
    for key in ("red/truncated.jpg", "red/text_file.png"):
        with pytest.raises(ImageReadError, match=key.split("/")[-1]):
            model.query(root / key, k=3)


def test_service_refuses_bad_uploads_and_answers_odd_ones(laced):
    work, root, corpus, _, args = laced
    for step in ("1_prepareData.py", "3_featurizeImages.py", "4_trainSvm.py"):
        result = run_script(step, *args, *PRETRAINED)
        assert result.returncode == 0, result.stderr[-2000:]
    from fastapi.testclient import TestClient

    import helpers
    from image_similarity.apps.service import create_app
    P = helpers.load_parameters([value for flag, value in zip(args[::2], args[1::2])] + ["rf_maxEpochs=0"])
    with TestClient(create_app(helpers.load_service(P))) as client:
        for key in corpus.bad:
            answer = client.post("/query", files={"image": (key.split("/")[-1], (root / key).read_bytes())},
                                 data={"k": "3"})
            assert 400 <= answer.status_code < 500, (key, answer.status_code)
            assert answer.json()["detail"], key
        for key in ("red/cmyk.jpg", "red/sixteen_bit.png", "red/animated.gif", "red/exif_orientation_6.jpg"):
            answer = client.post("/query", files={"image": (key, (root / key).read_bytes())}, data={"k": "3"})
            assert answer.status_code == 200 and len(answer.json()["results"]) == 3, key
        # A valid image over svc_maxImagePixels (40 MP) is refused from its header, before decoding.
        buffer = io.BytesIO()
        Image.new("1", (7_000, 6_000)).save(buffer, "PNG")
        answer = client.post("/query", files={"image": ("wide.png", buffer.getvalue())}, data={"k": "3"})
        assert answer.status_code == 422 and "7000x6000 is over the 40,000,000-pixel limit" in answer.json()["detail"]


def test_nothing_usable_is_a_clear_error(tmp_path):
    root = tmp_path / "data" / "broken"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        (root / label / "x.jpg").write_bytes(b"not an image")
    result = run_script("1_prepareData.py", "--set", f"workDir={tmp_path}", "--set", "datasetName=broken")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "error" in result.stderr.lower()


def test_wrong_set_name_or_type_is_refused_before_any_work(tmp_path):
    for bad in ("ratioTrainTst=0.5", "ratioTrainTest=half"):
        result = run_script("1_prepareData.py", "--set", f"workDir={tmp_path}", "--set", bad)
        assert result.returncode == 2 and "ratioTrainT" in result.stderr
        assert not (tmp_path / "proc").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("script, step_first", [("3_featurizeImages.py", "2_refineDNN.py"),
                                                ("4_trainSvm.py", "1_prepareData.py"),
                                                ("5_evaluate.py", "4_trainSvm.py")])
def test_missing_prerequisite_names_the_step_to_run(tiny_dataset, script, step_first):
    work = tiny_dataset.parents[1]
    if script == "5_evaluate.py":  # 5 needs 1 and 3 done, but not 4
        for step in ("1_prepareData.py", "3_featurizeImages.py"):
            assert run_script(step, "--set", f"workDir={work}", "--set", "datasetName=tiny", *PRETRAINED).returncode == 0
    result = run_script(script, "--set", f"workDir={work}", "--set", "datasetName=tiny")
    assert result.returncode != 0
    assert step_first in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_output_folder_blocked_by_a_file_is_a_clear_error(tiny_dataset):
    work = tiny_dataset.parents[1]
    (work / "results").write_text("a file where a folder should be")
    result = run_script("1_prepareData.py", "--set", f"workDir={work}", "--set", "datasetName=tiny")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "results" in result.stderr


def _limit_file_size():
    # Simulates a full disk: writes past 64 KiB fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_is_a_clear_error_and_leaves_no_partial_file(tiny_dataset):
    work = tiny_dataset.parents[1]
    args = ["--set", f"workDir={work}", "--set", "datasetName=tiny", *PRETRAINED]
    assert run_script("1_prepareData.py", *args).returncode == 0
    # No DataLoader workers: their shared-memory files would hit the limit too, and only the output should.
    result = subprocess.run([sys.executable, str(REPO / "3_featurizeImages.py"), *args, "--set", "run_nrWorkers=0"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    proc = work / "proc" / "tiny"
    assert not (proc / "features.npy").exists() and not (proc / "features.json").exists()
    assert not list(proc.glob(".*.tmp"))


def test_kill_during_featurize_then_rerun_gives_identical_features(tiny_dataset):
    work = tiny_dataset.parents[1]
    for i in range(40):  # enough images that the run is still going when it is killed
        make_image(tiny_dataset / "red" / f"extra_{i}.jpg", (190, 40, 40), size=(320, 240), pattern="stripes")
    args = ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "run_mbSize=4", *PRETRAINED]
    assert run_script("1_prepareData.py", *args).returncode == 0
    features = work / "proc" / "tiny" / "features.npy"
    assert run_script("3_featurizeImages.py", *args).returncode == 0
    uninterrupted = np.load(features)
    features.unlink()
    features.with_suffix(".json").unlink()
    process = subprocess.Popen([sys.executable, str(REPO / "3_featurizeImages.py"), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)  # the model is loaded and some batches are done
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Killed mid-run: either nothing was published, or (if it had already finished) a complete pair.
    assert features.exists() == features.with_suffix(".json").exists()
    result = run_script("3_featurizeImages.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(features.parent.glob(".*.tmp"))
    np.testing.assert_array_equal(np.load(features), uninterrupted)


def _make_read_only(folder):
    """chmod for ordinary users; root ignores modes, so it gets the immutable flag where the file system has it."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return lambda: folder.chmod(0o700)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: a read-only folder cannot be made")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_output_folder_is_a_clear_error(tiny_dataset):
    work = tiny_dataset.parents[1]
    results = work / "results" / "tiny"
    results.mkdir(parents=True)
    undo = _make_read_only(results)
    try:
        result = run_script("1_prepareData.py", "--set", f"workDir={work}", "--set", "datasetName=tiny")
    finally:
        undo()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and str(results) in result.stderr, result.stderr[-2000:]
    assert not list(results.iterdir())
