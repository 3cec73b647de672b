"""Peak memory and seconds per epoch of step 2 (2_refineDNN.py) with and without rf_activationCheckpointing.

Runs the real step 2, one epoch at the default 320 px and batch size on the tutorial's 3 texture labels (dotted,
striped, leopard) of ../shared/datasets/fashionTexture11 (the bundled fridgeObjects sample where it is absent), after
step 1, in a work folder under /tmp. Each arm runs in its own process; its peak is the largest resident set of the
processes it started (the training process; DataLoader workers are smaller), measured by the operating system
(getrusage of the finished children). Seconds per epoch come from step 2's refine_log.csv. The two arms alternate,
--repeats times each, so a machine that speeds up or slows down weighs on both.

    python bench/refine_memory.py [--images 256] [--repeats 1]

Prints the numbers and writes bench/results/refine_memory.json.
"""
import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from image_similarity.data.fileio import save_json  # noqa: E402
from image_similarity.models.engines import cpu_info  # noqa: E402

TEXTURES = REPO.parent / "shared" / "datasets" / "fashionTexture11"
LABELS = ("dotted", "striped", "leopard")
RESULTS = REPO / "bench" / "results" / "refine_memory.json"
# Runs one command and prints the largest resident set (bytes) of the processes it started, once they are done.
PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, done.returncode)")


def dataset(work):
    """The images as work/data/bench/<label>/: copies of the texture labels, or of the bundled sample (the one reader
    keeps to the image folder, so links out of it are not followed)."""
    target = work / "data" / "bench"
    target.mkdir(parents=True)
    source = TEXTURES if TEXTURES.is_dir() else REPO / "data" / "fridgeObjects"
    labels = LABELS if TEXTURES.is_dir() else sorted(p.name for p in source.iterdir() if p.is_dir())
    for label in labels:
        shutil.copytree(source / label, target / label)
    return source, labels


def step(script, work, *settings):
    args = ["--set", f"workDir={work}", "--set", "datasetName=bench", "--set", "dedup_enabled=False", *settings]
    return [sys.executable, str(REPO / script), *args]


def arm(work, checkpointing, n_images):
    """One epoch of step 2: (peak bytes, seconds for the epoch)."""
    for stale in ("model.pt", "refine_checkpoint.pt"):
        (work / "proc" / "bench" / stale).unlink(missing_ok=True)
    command = step("2_refineDNN.py", work, "--set", "rf_maxEpochs=1", "--set", "rf_inputResolution=320",
                   "--set", f"rf_maxTrainImages={n_images}", "--set", f"rf_activationCheckpointing={checkpointing}")
    done = subprocess.run([sys.executable, "-c", PEAK, *command], capture_output=True, text=True)
    line = [row for row in done.stdout.splitlines() if row.startswith("PEAK ")][-1].split()
    if line[2] != "0":
        raise SystemExit(f"step 2 failed ({checkpointing=}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with open(work / "results" / "bench" / "refine_log.csv", newline="", encoding="utf-8") as handle:
        seconds = float(list(csv.DictReader(handle))[-1]["seconds"])
    return int(line[1]), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="training images in the epoch (default: 256)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each arm (default: 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="refine_memory_") as tmp:
        work = Path(tmp)
        source, labels = dataset(work)
        prepared = subprocess.run(step("1_prepareData.py", work), capture_output=True, text=True)
        if prepared.returncode:
            raise SystemExit(f"step 1 failed:\n{prepared.stderr[-2000:]}")
        runs = {"off": [], "on": []}
        for _ in range(args.repeats):
            for name, checkpointing in (("off", False), ("on", True)):
                runs[name].append(arm(work, checkpointing, args.images))
                peak, seconds = runs[name][-1]
                print(f"rf_activationCheckpointing {name:>3}: peak {peak / 2**30:.2f} GiB, {seconds:.0f} s/epoch")
    summary = {name: {"peak_gib": round(max(p for p, _ in r) / 2**30, 3),
                      "seconds_per_epoch": round(statistics.median(s for _, s in r), 1)} for name, r in runs.items()}
    result = {"command": "python bench/refine_memory.py " + " ".join(sys.argv[1:]),
              "data": source.relative_to(REPO.parent).as_posix(), "labels": list(labels),
              "images_per_epoch": args.images, "input_resolution": 320, "cpu": cpu_info()["model"],
              "cores": len(os.sched_getaffinity(0)),
              "runs": {k: [[p, s] for p, s in v] for k, v in runs.items()}, **summary}
    save_json(RESULTS, result)
    print(json.dumps(summary))
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
