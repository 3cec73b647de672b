"""2_refineDNN.py run as a subprocess on the tiny generated dataset (64 px, batches of 8, no workers)."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import helpers
from conftest import REPO, run_script
from image_similarity.models.checkpoints import checkpoint_meta, load_checkpoint
from image_similarity.data import fileio
from image_similarity.data.splits import make_ranking_sets, save_ranking_sets, save_split

SCRIPT = "2_refineDNN.py"
FAST = ["--set", "rf_inputResolution=64", "--set", "rf_mbSize=8", "--set", "rf_nrWorkers=0",
        "--set", "rf_dropoutRate=0.2"]
# One intra-op thread per run: fast and predictable on the shared 2-core machine.
ENV = {"OMP_NUM_THREADS": "1"}


def write_step1_outputs(tmp_path, root, n_val=2, extra_train=(), dataset="tiny"):
    """What 1_prepareData.py leaves in proc/<dataset>/: split lists, validation ranking sets and the label table."""
    labels = sorted(p.name for p in root.iterdir())
    splits = {"train": {}, "val": {}, "test": {}}
    for label in labels:
        keys = sorted(f"{label}/{p.name}" for p in (root / label).iterdir())
        splits["val"][label], splits["train"][label], splits["test"][label] = keys[:n_val], keys[n_val:], []
    for key in extra_train:
        splits["train"][key.split("/")[0]].append(key)
    proc = tmp_path / "proc" / dataset
    for split, content in splits.items():
        save_split(proc / f"imgFilenames{split.title()}.json", content)
    save_ranking_sets(proc / "imgInfosVal.json", make_ranking_sets(splits["val"], 20, 100, 0))
    fileio.save_json(proc / "lutLabel2Id.json", {label: i for i, label in enumerate(labels)})
    return proc


def args_for(tmp_path, *more):
    return ["--set", f"workDir={tmp_path}", "--set", "datasetName=tiny", *FAST, *more]


def test_help():
    done = run_script(SCRIPT, "--help")
    assert done.returncode == 0
    assert "--resume" in done.stdout and "rf_maxEpochs=0" in done.stdout


def test_missing_step1_outputs_name_the_step(tmp_path):
    done = run_script(SCRIPT, *args_for(tmp_path), env=ENV)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'proc' / 'tiny' / 'imgFilenamesTrain.json'} not found: run 1_prepareData.py first"]


def test_zero_epochs_writes_nothing(tiny_dataset, tmp_path):
    proc = write_step1_outputs(tmp_path, tiny_dataset)
    before = sorted(p.name for p in proc.iterdir())
    done = run_script(SCRIPT, *args_for(tmp_path, "--set", "rf_maxEpochs=0"), env=ENV)
    assert done.returncode == 0, done.stderr
    assert "no refinement" in done.stdout and "pretrained" in done.stdout
    assert sorted(p.name for p in proc.iterdir()) == before
    assert not (tmp_path / "results").exists()


def test_refines_and_writes_model_log_and_curves(tiny_dataset, tmp_path):
    proc = write_step1_outputs(tmp_path, tiny_dataset, extra_train=["red/broken.jpg"])
    broken = tiny_dataset / "red" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    results = tmp_path / "results" / "tiny"
    fileio.save_csv(results / "skipped_images.tsv", ["path", "reason"], [["earlier/step.jpg", "from step 1"]], "\t")

    done = run_script(SCRIPT, *args_for(tmp_path, "--set", "rf_maxEpochs=2", "--set", "rf_boFreezeWeights=True",
                                        "--set", "rf_lrPerMb=[0.05]"), env=ENV)
    assert done.returncode == 0, done.stderr
    assert "device: cpu" in done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("Done: best epoch ") and "val accuracy" in summary and "min" in summary

    model, info = load_checkpoint(proc / "model.pt")
    assert info["classes"] == ["blue", "green", "red"] and info["data_config"].input_size == 64
    assert info["meta"]["epoch"] in (1, 2) and info["meta"]["train_params"]["batch_size"] == 8
    assert info["meta"]["n_val"] == 6 and info["meta"]["val_accuracy"] > 1 / 3
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    with open(results / "refine_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_err", "val_loss", "val_err", "seconds"]
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["lr"]) == 0.05
    with Image.open(results / "refine_curves.png") as img:
        assert img.format == "PNG" and img.size == (1000, 400)
    skipped = fileio.read_tsv(results / "skipped_images.tsv")
    assert ["earlier/step.jpg", "from step 1"] in skipped
    assert [row[0] for row in skipped[1:] if row[0] != "earlier/step.jpg"] == [str(broken)]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("side, resolution", [(60, 224), (330, 320)])
def test_auto_resolution_suits_the_training_images(tiny_dataset, tmp_path, side, resolution):
    """rf_inputResolution='auto': thumbnails train at 224 px; photos with 320 px on their shorter side at 320."""
    for path in tiny_dataset.rglob("*.jpg"):
        with Image.open(path) as img:
            img.convert("RGB").resize((side + 40, side)).save(path)
    proc = write_step1_outputs(tmp_path, tiny_dataset)
    done = run_script(SCRIPT, *args_for(tmp_path, "--set", "rf_inputResolution=auto", "--set", "rf_maxEpochs=1",
                                        "--set", "rf_boFreezeWeights=True"), env=ENV)
    assert done.returncode == 0, done.stderr
    assert (f"rf_inputResolution = 'auto': {resolution} px, for training images whose median shorter side is "
            f"{side} px.") in done.stdout
    assert f"at {resolution} px on 18 train / 6 val images" in done.stdout
    _, info = load_checkpoint(proc / "model.pt")
    assert info["data_config"].input_size == resolution and info["meta"]["train_params"]["input_resolution"] == resolution


@pytest.mark.slow
def test_kill_during_an_epoch_then_resume(tiny_dataset, tmp_path):
    """kill -9 once the first epoch's checkpoint exists; --resume finishes; a later plain run starts over."""
    proc = write_step1_outputs(tmp_path, tiny_dataset)
    checkpoint = proc / "refine_checkpoint.pt"
    args = args_for(tmp_path, "--set", "rf_maxEpochs=4", "--set", "rf_inputResolution=96")
    child = subprocess.Popen([sys.executable, str(REPO / SCRIPT), *args], cwd=REPO, env={**os.environ, **ENV},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (proc / "model.pt").exists()

    done = run_script(SCRIPT, *args, "--resume", env=ENV)
    assert done.returncode == 0, done.stderr
    assert "Resumed after epoch" in done.stdout
    load_checkpoint(proc / "model.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 4 and [r["epoch"] for r in state["log_rows"]] == [1, 2, 3, 4]
    assert not list(tmp_path.rglob("*.tmp"))

    again = run_script(SCRIPT, *args_for(tmp_path, "--set", "rf_maxEpochs=1"), env=ENV)
    assert again.returncode == 0, again.stderr
    assert "Ignoring the existing checkpoint" in again.stdout
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1


def test_falls_back_to_the_pretrained_network_when_validation_prefers_it(sample_dir, tmp_path):
    """Real photos, a refinement wrecked on purpose (learning rate 2, 48 px): step 2 says that the pretrained network
    ranks validation better, records it in model.pt, and the pipeline keeps the pretrained network unless
    rf_fallbackToPretrained is off."""
    root = tmp_path / "data" / "fridge"
    for label in ("can", "carton", "milk_bottle"):
        for src in sorted((sample_dir / label).iterdir())[:6]:
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / src.name).write_bytes(src.read_bytes())
    proc = write_step1_outputs(tmp_path, root, n_val=3, dataset="fridge")
    common = ["--set", f"workDir={tmp_path}", "--set", "datasetName=fridge", *FAST, "--set", "rf_maxEpochs=1",
              "--set", "rf_inputResolution=48", "--set", "rf_lrPerMb=[2.0]"]
    done = run_script(SCRIPT, *common, env=ENV)
    assert done.returncode == 0, done.stderr
    assert "ranks validation WORSE than the pretrained one: steps 3+ will use the pretrained" in done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith("steps 3+ use the pretrained network.")
    meta = checkpoint_meta(proc / "model.pt")
    assert meta["pretrained_ranks_better"] is True
    refined, pretrained = meta["val_ranking"]["refined"], meta["val_ranking"]["pretrained"]
    assert refined["n_sets"] == pretrained["n_sets"] == 9
    assert (pretrained["top1"], -pretrained["mean_rank"]) > (refined["top1"], -refined["mean_rank"])

    P = helpers.load_parameters([f"workDir={tmp_path}", "datasetName=fridge"])
    assert helpers.featurizing_model(P) == helpers.featurizing_model(P, fallback=True) == "efficientnet_lite0"
    told = helpers.load_parameters([f"workDir={tmp_path}", "datasetName=fridge", "rf_fallbackToPretrained=False"])
    assert helpers.featurizing_model(told) == proc / "model.pt"
