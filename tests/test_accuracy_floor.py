"""Regression floor: the default pipeline on the bundled sample still ranks as well as it was measured to.

The floor is seed 0's test top-1 of the ranker chosen on validation in ``bench/accuracy.py data/fridgeObjects
--seeds 0,1,2`` (read from bench/results/accuracy_fridgeObjects.json, so a re-measurement moves it), minus a margin;
the test runs seed 0, the default. Not the lowest seed: on 17 validation images the choice of ranker is noisy, and
seed 1 chose the weighted L2 distance (11% on test), which would leave no floor at all.
"""
import csv
import json

import pytest

from conftest import REPO, SAMPLE_DIR, run_script

MEASURED = REPO / "bench" / "results" / "accuracy_fridgeObjects.json"
# 5 of the 35 test queries: another CPU's float order changes the fine-tuning a little. On seed 0 the class-probability
# rankers lead the others on validation by 53 points of top-1 (12 of 17 queries against 3), so the choice stays among
# them, and they range over 51-74% on test; a broken step (preprocessing, labels, ranker) falls towards random, 1-3%.
MARGIN = 0.15


def measured_floor():
    run = next(run for run in json.loads(MEASURED.read_text())["runs"] if run["seed"] == 0)
    return run["metrics"][run["best"]]["top1"]


@pytest.mark.slow
def test_default_pipeline_on_the_sample_keeps_its_accuracy(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fridgeObjects").symlink_to(SAMPLE_DIR, target_is_directory=True)
    result = run_script("run_pipeline.py", "--set", f"workDir={tmp_path}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = tmp_path / "results" / "fridgeObjects"
    with open(results / "evaluation.csv", newline="") as handle:
        best = next(row["ranker"] for row in csv.DictReader(handle) if row["best_on_val"] == "1")
    metrics = json.loads((results / "evaluation.json").read_text())
    assert metrics[best]["top1"] >= measured_floor() - MARGIN, (best, metrics[best])
    assert metrics[best]["top1"] > metrics["random"]["top1"] + 0.3
