"""Label issues: the finder on embeddings with known flipped labels, atomic outputs, the exclude file, and A6 itself."""
import csv
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import make_labelled_images, run_script
from image_similarity.models.checkpoints import load_checkpoint
from image_similarity.data import fileio
from image_similarity.apps import label_issues
from image_similarity.pipeline import plots
from image_similarity.search import ranker_files, rankers
from image_similarity.search.rankers import ClassProbRanker
from image_similarity.data.splits import RankingSet, label_of, load_ranking_sets, load_split

LABELS = ("blue", "green", "red")


def clustered(n_per_label=20, dim=32, seed=0):
    """Keys, splits, labels and embeddings: three well-separated clusters; every 5th image is a test image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(LABELS), dim)) * 4
    keys, splits, labels, rows = [], [], [], []
    for c, label in enumerate(LABELS):
        for i in range(n_per_label):
            keys.append(f"{label}/{label}_{i}.jpg")
            splits.append("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train")
            labels.append(label)
            rows.append(centres[c] + rng.normal(size=dim))
    return keys, splits, labels, np.array(rows, np.float32)


@pytest.mark.parametrize("method, n_repeats", [(method, 1) for method in label_issues.RANKING_METHODS]
                         + [("self_confidence", 3)])
def test_flipped_labels_rank_first_with_the_true_label_suggested(method, n_repeats):
    keys, splits, labels, X = clustered()
    flips = {2: "green", 23: "red", 47: "blue", 25: "blue"}  # train, train, train, test image
    assert splits[25] == "test"
    for row, label in flips.items():
        labels[row] = label
    proba, classes, C = label_issues.out_of_sample_probabilities(X, labels, splits, [0.1, 1.0], n_folds=4,
                                                                 random_state=0, n_repeats=n_repeats)
    assert proba.shape == (60, 3) and np.allclose(proba.sum(1), 1) and C in (0.1, 1.0)
    issues = label_issues.find_label_issues(keys, splits, labels, proba, classes, method)
    top = issues.rows[:len(flips)]
    assert {row["key"] for row in top} == {keys[row] for row in flips}
    assert [row["rank"] for row in issues.rows] == list(range(1, 61))
    for row in top:
        assert row["suggested_label"] == label_of(row["key"]) != row["given_label"]
        assert row["flagged"] == "yes" and row["p_given_label"] < 0.5
    assert issues.n_flagged >= len(flips) and all(row["flagged"] == "no" for row in issues.rows[10:])
    with pytest.raises(ValueError, match="ranking method"):
        label_issues.find_label_issues(keys, splits, labels, proba, classes, "entropy")
    with pytest.raises(ValueError, match="C criterion must be one of"):
        label_issues.out_of_sample_probabilities(X, labels, splits, [1.0], C_criterion="auc")


def test_repeats_average_the_out_of_fold_probabilities_of_other_fold_assignments():
    keys, splits, labels, X = clustered()
    classifier = ClassProbRanker(C=1.0, random_state=0)
    once, classes = label_issues.out_of_fold_probabilities(classifier, X, labels, n_folds=4, random_state=0)
    averaged, _ = label_issues.out_of_fold_probabilities(classifier, X, labels, n_folds=4, random_state=0, n_repeats=3)
    assert averaged.shape == once.shape == (60, 3) and np.allclose(averaged.sum(1), 1)
    assert not np.allclose(averaged, once)  # other fold assignments: other classifiers
    assert np.array_equal(averaged.argmax(1), once.argmax(1))  # well-separated clusters: the same labels


def test_test_images_are_scored_by_a_classifier_that_never_saw_them():
    keys, splits, labels, X = clustered()
    test = [i for i, split in enumerate(splits) if split == "test"]
    X_moved = X.copy()
    X_moved[test] = X[test[0]]  # if the test rows were in any fit, changing them would change the others' scores
    a, _, _ = label_issues.out_of_sample_probabilities(X, labels, splits, [1.0], random_state=0)
    b, _, _ = label_issues.out_of_sample_probabilities(X_moved, labels, splits, [1.0], random_state=0)
    fit_rows = [i for i in range(len(keys)) if i not in test]
    assert np.array_equal(a[fit_rows], b[fit_rows])


def test_near_duplicates_with_different_labels_are_paired():
    groups = [["red/a.jpg", "blue/b.jpg", "red/c.jpg"], ["green/d.jpg", "green/e.jpg"]]
    assert label_issues.different_label_duplicates(groups, label_of) == {
        "red/a.jpg": ["blue/b.jpg"], "blue/b.jpg": ["red/a.jpg", "red/c.jpg"], "red/c.jpg": ["blue/b.jpg"]}


def test_csv_and_png_are_written_atomically(tmp_path):
    """A reader holding the old file keeps it whole: the new file is renamed over the path, never written into it."""
    keys, splits, labels, X = clustered(n_per_label=10)
    proba, classes, _ = label_issues.out_of_sample_probabilities(X, labels, splits, [1.0], n_folds=3, random_state=0)
    issues = label_issues.find_label_issues(keys, splits, labels, proba, classes)
    csv_path, png_path = tmp_path / "label_issues.csv", tmp_path / "label_issues.png"
    for path in (csv_path, png_path):
        path.write_bytes(b"old")
        os.link(path, tmp_path / f"held_{path.name}")
        (tmp_path / f".{path.name}.123.tmp").write_bytes(b"left by a killed write")
    label_issues.save_label_issues(csv_path, issues)
    plots.plot_contact_sheet([(Image.new("RGB", (20, 20)), "1. a\ngiven x"), (None, "2. unreadable")], png_path,
                             columns=2)
    for path in (csv_path, png_path):
        assert (tmp_path / f"held_{path.name}").read_bytes() == b"old"
    assert not list(tmp_path.glob("*.tmp"))
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(label_issues.LABEL_ISSUE_COLUMNS) and len(rows) == 30
    with Image.open(png_path) as img:
        assert img.format == "PNG" and img.size == (400, 260)


def test_exclude_file_ignores_test_images_and_refuses_unknown_keys(caplog):
    split_of = {"red/a.jpg": "train", "red/b.jpg": "val", "blue/c.jpg": "test"}
    with caplog.at_level(logging.WARNING):
        excluded = label_issues.read_exclude_file([["key", "split"], ["red/a.jpg", "train"], ["red/b.jpg"],
                                                   ["blue/c.jpg", "test"]], split_of, "ex.tsv")
    assert excluded == {"red/a.jpg", "red/b.jpg"}
    assert "blue/c.jpg" in caplog.text and "never excluded" in caplog.text
    with pytest.raises(ValueError, match=r"ex.tsv: 'red/zzz.jpg' is not an image"):
        label_issues.read_exclude_file([["red/a.jpg"], ["red/zzz.jpg"]], split_of, "ex.tsv")


def test_without_keys_drops_sets_and_negatives():
    sets = [RankingSet("r/q.jpg", "r/p.jpg", ["b/x.jpg", "g/y.jpg"], ["b/x.jpg", "r/p.jpg", "g/y.jpg"]),
            RankingSet("r/p.jpg", "r/q.jpg", ["b/x.jpg"], ["r/q.jpg", "b/x.jpg"])]
    kept = label_issues.without_keys(sets, {"b/x.jpg", "r/p.jpg"})
    assert len(kept) == 0
    kept = label_issues.without_keys(sets, {"b/x.jpg"})
    assert [(s.negatives, s.references) for s in kept] == [(["g/y.jpg"], ["r/p.jpg", "g/y.jpg"]),
                                                           ([], ["r/q.jpg"])]
    assert sets[0].negatives == ["b/x.jpg", "g/y.jpg"]


# ---- the scripts, on generated images -------------------------------------------------------------------------

def settings(work):
    return ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "run_nrWorkers=0", "--set", "ratioValFromTrain=0.3",
            *(arg for split in ("train", "val", "test") for arg in ("--set", f"{split}_maxNegImgsPerQueryImg=10")),
            "--set", "svm_CValCandidates=[1.0]", "--set", "svm_classProbCValCandidates=[1.0, 10.0]",
            "--set", "li_nrFolds=3", "--set", "li_nrShown=6"]


def run_ok(script, *args, **kwargs):
    done = run_script(script, *args, **kwargs)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """3 labels x 12 generated images plus 2 red images filed under green; steps 1 and 3 run (frozen network)."""
    work = tmp_path_factory.mktemp("label_issues")
    root = make_labelled_images(work / "data" / "tiny", 12)
    for i in (0, 1):
        shutil.move(root / "red" / f"red_{i}.jpg", root / "green" / f"misfiled_red_{i}.jpg")
    for script in ("1_prepareData.py", "3_featurizeImages.py"):
        run_ok(script, *settings(work))
    return work


def test_help():
    done = run_ok("A6_findLabelIssues.py", "--help")
    assert "--folder" in done.stdout and "label_issues.csv" in done.stdout


def test_a6_ranks_the_misfiled_images_first(pipeline):
    done = run_ok("A6_findLabelIssues.py", *settings(pipeline))
    assert done.stdout.strip().splitlines()[-1].startswith("Done: 36 images scored")
    assert "(best validation log loss)" in done.stdout  # svm_classProbCCriterion's default; no step 4 yet
    results = pipeline / "results" / "tiny"
    with open(results / "label_issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["key"] for row in rows[:2]} == {"green/misfiled_red_0.jpg", "green/misfiled_red_1.jpg"}
    assert all(row["given_label"] == "green" and row["suggested_label"] == "red" for row in rows[:2])
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    with Image.open(results / "label_issues.png") as img:
        assert img.format == "PNG" and img.size == (1200, 300)


def test_a6_reuses_step_4s_C_only_when_chosen_by_the_same_rule(pipeline, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(pipeline, work, symlinks=True)
    run_ok("4_trainSvm.py", *settings(work))
    step4_C = ranker_files.load_payload(work / "proc" / "tiny" / "classprob.skops", None)["ranker"].C
    assert f"C = {step4_C:g} (step 4's)" in run_ok("A6_findLabelIssues.py", *settings(work)).stdout
    other_rule = run_ok("A6_findLabelIssues.py", *settings(work), "--set", "svm_classProbCCriterion=accuracy")
    assert "(best validation accuracy)" in other_rule.stdout and "step 4's" not in other_rule.stdout
    payload = ranker_files.load_payload(work / "proc" / "tiny" / "classprob.skops", None)
    ranker_files.save_payload(work / "proc" / "tiny" / "classprob.skops", **{**payload, "model_id": "sha256:older"})
    stale = run_ok("A6_findLabelIssues.py", *settings(work))  # step 4's file is for other features: not a stop
    assert "(best validation log loss)" in stale.stdout and "choosing C here instead" in stale.stderr


@pytest.mark.parametrize("knob, value", [("svm_classProbCCriterion", "auc"), ("li_rankedBy", "margin")])
def test_a6_refuses_an_unknown_choice_before_any_work(pipeline, tmp_path, knob, value):
    done = run_script("A6_findLabelIssues.py", "--folder", pipeline / "data" / "tiny", "--set", f"workDir={tmp_path}",
                      "--set", f"{knob}={value}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{knob} must be one of" in done.stderr and repr(value) in done.stderr
    assert "Embedding" not in done.stdout and not (tmp_path / "results").exists()


def test_a6_on_any_labelled_folder(tmp_path):
    root = make_labelled_images(tmp_path / "shop", 5)
    shutil.copy(root / "blue" / "blue_0.jpg", root / "red" / "copy_of_blue.jpg")  # a different-label duplicate
    done = run_ok("A6_findLabelIssues.py", "--folder", root, "--set", f"workDir={tmp_path}", "--set",
                  "run_nrWorkers=0", "--set", "li_nrFolds=3", "--set", "svm_classProbCValCandidates=[1.0]")
    assert "Near-duplicates with different labels: blue/blue_0.jpg and red/copy_of_blue.jpg" in done.stdout
    with open(tmp_path / "results" / "shop" / "label_issues.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {row["split"] for row in rows} == {"unsplit"}
    assert rows[0]["key"] == "red/copy_of_blue.jpg" and rows[0]["duplicate_with_other_label"] == "blue/blue_0.jpg"


def test_steps_2_and_4_train_without_the_excluded_images(pipeline):
    proc = pipeline / "proc" / "tiny"
    splits = {split: [k for ks in load_split(proc / f"imgFilenames{split.title()}.json").values()
                      for k in ks] for split in ("train", "val", "test")}
    listed = [splits["train"][0], splits["train"][1], splits["val"][0], splits["test"][0]]
    fileio.save_csv(pipeline / "exclude.tsv", ["key"], [[key] for key in listed], delimiter="\t")
    knob = ["--set", "labelIssuesExcludeFile=exclude.tsv"]

    done = run_ok("4_trainSvm.py", *settings(pipeline), *knob)
    assert "leaving 3 train/val image(s)" in done.stdout
    assert "1 test image(s) ignored" in done.stderr and splits["test"][0] in done.stderr
    test_sets = load_ranking_sets(proc / "imgInfosTest.json")
    assert any(splits["test"][0] in (s.query, s.positive, *s.negatives) for s in test_sets)
    assert f"from {len(test_sets)} ranking sets" in next(line for line in done.stdout.splitlines()
                                                          if line.startswith("test "))  # every test set kept
    refine = ["--set", "rf_maxEpochs=1", "--set", "rf_inputResolution=64", "--set", "rf_mbSize=8",
              "--set", "rf_nrWorkers=0", "--set", "rf_boFreezeWeights=True"]
    run_ok("2_refineDNN.py", *settings(pipeline), *refine, *knob, env={"OMP_NUM_THREADS": "1"})
    meta = load_checkpoint(proc / "model.pt")[1]["meta"]
    assert (meta["n_train"], meta["n_val"]) == (len(splits["train"]) - 2, len(splits["val"]) - 1)

    fileio.save_csv(pipeline / "exclude.tsv", ["key"], [[splits["train"][0]], ["red/not_there.jpg"]], "\t")
    for script, extra in (("4_trainSvm.py", []), ("2_refineDNN.py", refine)):
        failed = run_script(script, *settings(pipeline), *extra, *knob)
        assert failed.returncode == 1 and "'red/not_there.jpg' is not an image of this dataset" in failed.stderr
