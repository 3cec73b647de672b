"""Ranking accuracy of the default pipeline on a labelled folder, over several seeds, through the scripts themselves.

For each seed it runs ``run_pipeline.py`` (steps 1-5) in a scratch workDir whose ``data/<name>`` links to DATA_DIR,
then reads the test metrics of every ranker from ``evaluation.json``, which ranker was chosen on validation, and the
training minutes of step 2. It then runs ``5_evaluate.py --on val`` and records every ranker's validation metrics,
with step 2's validation comparison of the refined and pretrained embeddings, so that recipes can be compared on
validation (``val_metrics``, ``refine_val_ranking`` per run). Prints a mean ± std table and writes
``bench/results/accuracy_<name>.json``, after every seed (a run stopped part-way keeps the seeds it finished).

    .venv/bin/python bench/accuracy.py ../shared/datasets/fashionTexture11 --labels dotted,striped,leopard --seeds 0,1,2
    .venv/bin/python bench/accuracy.py ../shared/datasets/fashionTexture11 --seeds 0,1,2 --name textures11
    .venv/bin/python bench/accuracy.py data/fridgeObjects --seeds 0,1,2 --set rf_maxEpochs=0 --name fridge_frozen
With ``--keep DIR`` each seed's workDir stays as ``DIR/seed<N>`` (for bench/ranking_failures.py, or to look at the
figures); otherwise it is a temporary folder, removed at the end. ``--from-step 4 --keep DIR`` re-runs only steps 4
and 5 in the workDirs an earlier ``--keep DIR`` run left (same seeds and settings): for a change to steps 4-5, with
no retraining; the training minutes are those of the kept step 2. ``--gather NAME ...`` runs nothing: it joins the
seeds of earlier JSONs made on the same data with the same settings (e.g. a run stopped part-way and the run that
finished its seeds) into ``accuracy_<--name>.json``, each run with the command and code that made it:

    .venv/bin/python bench/accuracy.py --gather tex11_s0 tex11_s12 --name fashionTexture11
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from image_similarity.models import checkpoints  # noqa: E402
from image_similarity.data.fileio import save_json  # noqa: E402
from run_pipeline import STEPS  # noqa: E402

METRICS = ("top1", "top5", "mean_rank", "median_rank", "mrr", "map")


def run_seed(data_dir, name, labels, seed, overrides, scratch, from_step=1):
    """Run steps ``from_step``-5 for one seed (1: the whole pipeline).

    Returns ({ranker: test metrics}, best ranker on val, train minutes, wall minutes, {ranker: validation metrics},
    step 2's validation ranking of the refined and pretrained embeddings or None).
    """
    work = scratch / f"seed{seed}"
    link = work / "data" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():  # a --keep folder from an earlier run
        link.unlink()
    link.symlink_to(Path(data_dir).resolve(), target_is_directory=True)
    sets = [f"workDir={work}", f"datasetName={name}", f"randomSeed={seed}", *overrides]
    if labels:
        sets.append(f"includeLabels={labels!r}")
    scripts = ["run_pipeline.py"] if from_step == 1 else STEPS[from_step - 1:]
    start = time.perf_counter()
    for script in scripts:
        command = [sys.executable, str(REPO / script)] + [a for s in sets for a in ("--set", s)]
        print(f"\n### seed {seed}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
    wall = (time.perf_counter() - start) / 60
    results = work / "results" / name
    metrics = json.loads((results / "evaluation.json").read_text())
    with open(results / "evaluation.csv", newline="") as handle:
        best = next(row["ranker"] for row in csv.DictReader(handle) if row["best_on_val"] == "1")
    test_outputs = {path: path.read_bytes() for path in results.iterdir() if path.is_file()}
    subprocess.run([sys.executable, str(REPO / "5_evaluate.py"), "--on", "val", "--set", "eval_boVisualizeResults=False"]
                   + [a for s in sets for a in ("--set", s)], check=True, stdout=subprocess.DEVNULL)
    val_metrics = json.loads((results / "evaluation.json").read_text())
    for path, content in test_outputs.items():  # a --keep folder keeps the test evaluation
        path.write_bytes(content)
    model = work / "proc" / name / "model.pt"
    refine_val = checkpoints.checkpoint_meta(model).get("val_ranking") if model.exists() else None
    log = results / "refine_log.csv"
    train_minutes = 0.0
    if log.exists():
        with open(log, newline="") as handle:
            train_minutes = sum(float(row["seconds"]) for row in csv.DictReader(handle)) / 60
    return metrics, best, train_minutes, wall, val_metrics, refine_val


def code_version():
    """``git describe`` of the repository, ``-dirty`` when tracked files other than bench/results/ differ from it.

    Results written by earlier runs do not change the code that runs. None outside git or without git.
    """
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    try:
        described = git("describe", "--always")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except OSError:  # no git on this machine
        return None
    return (described + ("-dirty" if changed else "")) if described else None


def summarise(runs):
    """Mean and std over seeds of each ranker's metrics, plus the val-chosen ranker's own row."""
    rankers = list(runs[0]["metrics"])
    table = {}
    for ranker in rankers + ["best_on_val"]:
        rows = [run["metrics"][run["best"] if ranker == "best_on_val" else ranker] for run in runs]
        table[ranker] = {m: {"mean": float(np.mean([r[m] for r in rows])), "std": float(np.std([r[m] for r in rows]))}
                         for m in METRICS if m in rows[0]}  # an older run's JSON may lack a metric added since
    return table


def result_path(name):
    return RESULTS / f"accuracy_{name}.json"


def gather(names, out_name):
    """Join the runs of ``accuracy_<name>.json`` for ``names`` into ``accuracy_<out_name>.json``.

    The parts must share their labels and overrides (the same protocol) and hold distinct seeds; each run keeps the
    ``command`` and ``code`` of its part. Returns the written path.
    """
    parts = []
    for name in names:
        path = result_path(name)
        if not path.is_file():
            sys.exit(f"error: {path} is missing: run bench/accuracy.py with --name {name} first")
        parts.append((name, json.loads(path.read_text())))
    for key in ("labels", "overrides"):
        values = {json.dumps(part[key], sort_keys=True) for _, part in parts}
        if len(values) > 1:
            sys.exit(f"error: --gather: the parts differ in {key} ({', '.join(sorted(values))}): not one protocol")
    runs = [{**run, "command": part["command"], "code": part["code"]} for _, part in parts for run in part["runs"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) < len(seeds):
        sys.exit(f"error: --gather: a seed appears twice among {', '.join(names)} (seeds {seeds})")
    runs.sort(key=lambda run: run["seed"])
    first = parts[0][1]
    out = result_path(out_name)
    save_json(out, {"command": f"bench/accuracy.py --gather {' '.join(names)} --name {out_name}",
                    "gathered_from": [{"name": name, "command": part["command"], "code": part["code"],
                                       "seeds": part["seeds"]} for name, part in parts],
                    "code": ", ".join(dict.fromkeys(part["code"] or "unknown" for _, part in parts)),
                    "from_step": max(part["from_step"] for _, part in parts), "dataset": out_name,
                    "labels": first["labels"], "seeds": [run["seed"] for run in runs], "overrides": first["overrides"],
                    "machine": first["machine"], "summary": summarise(runs), "runs": runs})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, nargs="?", help="folder with one sub-folder per label")
    parser.add_argument("--labels", default="", help="comma-separated label folders to use (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds (default: 0,1,2)")
    parser.add_argument("--name", help="dataset name for the run and the JSON file (default: from the folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="PARAMETERS.py override passed to every step (repeatable)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each seed's workDir as DIR/seed<N>")
    parser.add_argument("--from-step", type=int, default=1, choices=range(1, len(STEPS) + 1),
                        help="first step to run; above 1 it needs the workDirs of an earlier --keep DIR run")
    parser.add_argument("--gather", nargs="+", metavar="NAME",
                        help="run nothing: join these earlier JSONs' seeds (same protocol) into the --name JSON")
    args = parser.parse_args()
    if args.gather:
        if not args.name:
            parser.error("--gather needs --name, the JSON it writes")
        print(f"wrote {gather(args.gather, args.name)}")
        return
    if args.data_dir is None:
        parser.error("give DATA_DIR (or --gather)")
    if not args.data_dir.is_dir():
        sys.exit(f"error: {args.data_dir} is not a folder (the texture set lives in ../shared/datasets/)")
    labels = [label for label in args.labels.split(",") if label]
    name = args.name or (args.data_dir.resolve().name + (f"_{len(labels)}labels" if labels else ""))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.from_step > 1 and not (args.keep and all((args.keep / f"seed{s}" / "proc").is_dir() for s in seeds)):
        sys.exit(f"error: --from-step {args.from_step} needs --keep DIR holding seed<N>/ workDirs of an earlier run")

    version = code_version()  # at the start: the code that ran, even if the tree changes meanwhile
    out = result_path(name)
    command = " ".join(["bench/accuracy.py", str(args.data_dir), *(["--labels", args.labels] if labels else []),
                        "--seeds", args.seeds, *(["--name", args.name] if args.name else []),
                        *[a for s in args.overrides for a in ("--set", s)],
                        *(["--keep", str(args.keep)] if args.keep else []),
                        *(["--from-step", str(args.from_step)] if args.from_step > 1 else [])])
    runs = []
    with tempfile.TemporaryDirectory(prefix="accuracy_") as scratch:
        for seed in seeds:
            metrics, best, train_minutes, wall, val_metrics, refine_val = run_seed(
                args.data_dir, name, labels, seed, args.overrides, args.keep or Path(scratch), args.from_step)
            runs.append({"seed": seed, "best": best, "train_minutes": train_minutes, "wall_minutes": wall,
                         "metrics": metrics, "val_metrics": val_metrics, "refine_val_ranking": refine_val})
            # Saved after every seed: a long run stopped part-way keeps the seeds it finished ("seeds" says which).
            save_json(out, {"command": command, "code": version, "from_step": args.from_step,
                            "dataset": name, "labels": labels or "all",
                            "seeds": [run["seed"] for run in runs], "overrides": args.overrides,
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "summary": summarise(runs),
                            "runs": runs})
    table = summarise(runs)

    print(f"\n{name}: test metrics over seeds {seeds} (mean ± std)")
    print(f"{'ranker':17}" + "".join(f"{m:>18}" for m in METRICS))
    for ranker, values in table.items():
        cells = [(f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}%" if m.startswith("top") else
                  f"{v['mean']:.3f} ± {v['std']:.3f}") for m, v in values.items()]
        print(f"{ranker:17}" + "".join(f"{c:>18}" for c in cells))
    print("chosen on validation: " + ", ".join(f"seed {r['seed']}: {r['best']}" for r in runs))
    print("validation top-1 (cosine / chosen ranker): " + ", ".join(
        f"seed {r['seed']}: {100 * r['val_metrics']['cosine']['top1']:.1f}% / "
        f"{100 * r['val_metrics'][r['best']]['top1']:.1f}%" for r in runs))
    for r in runs:
        if r["refine_val_ranking"]:
            print(f"step 2, seed {r['seed']}, validation cosine top-1: " + ", ".join(
                f"{k} {100 * v['top1']:.1f}%" for k, v in r["refine_val_ranking"].items()))
    print("training minutes per run: " + ", ".join(f"{r['train_minutes']:.1f}" for r in runs))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
