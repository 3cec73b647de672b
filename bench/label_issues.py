"""How well A6_findLabelIssues.py finds wrong labels, what excluding its suspects does, and what it costs.

Two parts, each run through the scripts themselves in scratch workDirs whose ``data/<name>`` links to the data:

``planted``: flip 5% of the non-test (train + validation) labels of fashionTexture11 at random (seeded): the
flipped images move, as symlinks, into another label's folder of a copy of the dataset, and a splitFile keeps the
clean run's train/test split. Then steps 1, (2), 3 and A6 run on the noisy copy, and the precision and recall of
the flipped images among the top K train+val suspects are reported for K = 1, 2 and 3 times the number flipped.
``--arm frozen`` uses the pretrained network (rf_maxEpochs=0); ``--arm refined`` refines it on the noisy labels
first (step 2 at the given settings; a model.pt already in the workDir is reused and the JSON says so).

``real``: on the unmodified set (``--labels`` for the 3-label subset), per seed: steps 1 and 3 (frozen), A6, the top
20 suspects, and the validation and test metrics of the class-probability rankers when the classifier is refitted
without the top k training suspects (k = 0, 10, 20, 40) on the same frozen embeddings.

    .venv/bin/python bench/label_issues.py planted --arm frozen --work /tmp/li
    nice -n 10 .venv/bin/python bench/label_issues.py planted --arm refined --work /tmp/li
    .venv/bin/python bench/label_issues.py real --labels dotted,striped,leopard --seeds 0,1,2 --work /tmp/li
    .venv/bin/python bench/label_issues.py real --seeds 0,1,2 --work /tmp/li

``variants``: after ``real`` on every label, finder variants (one 5-fold, one 10-fold, 3 averaged 5-folds, cosine
k-NN) on plantings made in memory on the frozen embeddings and the splits of other seeds than ``planted``'s, to
choose a finder without tuning on the reported planting.

    nice -n 10 .venv/bin/python bench/label_issues.py variants --work /tmp/li

Writes ``bench/results/label_issues_planted_<arm>.json``, ``bench/results/label_issues_real_<name>.json`` and
``bench/results/label_issues_variants_frozen.json``.
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.neighbors import KNeighborsClassifier

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from image_similarity.pipeline import evaluation, training
from image_similarity.data import features, fileio
from image_similarity.apps import label_issues
from image_similarity.search import rankers  # noqa: E402
from image_similarity.data.features import load_features  # noqa: E402
from image_similarity.data.splits import SPLITS, label_of, load_ranking_sets  # noqa: E402
from image_similarity.data.splits import split_keys as read_split_keys  # noqa: E402

DATA = REPO.parent / "shared" / "datasets" / "fashionTexture11"
NAME = "fashionTexture11"
EXCLUDE_KS = (0, 10, 20, 40)


def run_step(script, work, name, *overrides):
    """Run one pipeline script in ``work`` with ``name`` as the dataset; returns (wall seconds, its stdout)."""
    sets = [f"workDir={work}", f"datasetName={name}", *overrides]
    command = [sys.executable, str(REPO / script)] + [a for s in sets for a in ("--set", s)]
    print(f"\n### {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                          text=True)
    print(done.stdout, end="", flush=True)
    return time.perf_counter() - start, done.stdout


def a6_seconds(stdout):
    """The seconds A6 reports in its summary line (its work, without the interpreter's start-up)."""
    return float(re.search(r"([0-9.]+) s\.$", stdout.strip()).group(1))


def link_data(work, name, data_dir):
    link = Path(work) / "data" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(Path(data_dir).resolve(), target_is_directory=True)


def split_keys(work, name):
    """``{split: [keys]}`` written by step 1 in ``work``."""
    proc = Path(work) / "proc" / name
    return {split: read_split_keys(proc / f"imgFilenames{split.title()}.json") for split in SPLITS}


def read_issues(work, name):
    with open(Path(work) / "results" / name / "label_issues.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def flip_labels(keys, fraction, seed):
    """``{key: another label}`` for a seeded random ``fraction`` of ``keys``, each moved to a random other label."""
    labels = sorted({label_of(k) for k in keys})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(keys, size=round(fraction * len(keys)), replace=False).tolist())
    return {key: str(rng.choice([other for other in labels if other != label_of(key)]))
            for key in keys if key in chosen}


def plant_noise(work, fraction, seed):
    """A noisy copy of fashionTexture11 under ``work/noisy``; returns ({noisy key: true label}, n non-test)."""
    clean = Path(work) / "clean"
    link_data(clean, NAME, DATA)
    if not (clean / "proc" / NAME / "imgFilenamesTest.json").exists():
        run_step("1_prepareData.py", clean, NAME, f"randomSeed={seed}")
    keys = split_keys(clean, NAME)
    non_test = keys["train"] + keys["val"]
    flipped = flip_labels(non_test, fraction, seed)
    noisy = Path(work) / "noisy"
    rows, truth = [], {}
    for split, split_list in (("train", non_test), ("test", keys["test"])):
        for key in split_list:
            label, file = key.split("/", 1)
            if key in flipped:
                new_key = f"{flipped[key]}/flipped_{label}_{file}"
                truth[new_key] = label
            else:
                new_key = key
            target = noisy / new_key
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # a copy: list_images refuses symlinks that leave the image folder
                shutil.copyfile(DATA / key, target)
            rows.append((new_key, split))
    fileio.save_csv(noisy / "split.tsv", ["#key", "split"], rows, delimiter="\t")
    return truth, len(non_test)


def precision_recall(issues, flipped):
    """Precision and recall of the flipped keys among the top K train+val suspects, K = 1, 2, 3 x flipped.

    ``issues`` ranked as A6 wrote them (li_rankedBy), and re-ranked by the other cleanlab score: normalized margin,
    p(given) - p(best other label), which orders the same as cleanlab's rescaled version.
    """
    scored = [row for row in issues if row["split"] in ("train", "val")]
    margin = sorted(scored, key=lambda row: float(row["p_given_label"]) - float(row["p_suggested_label"]))
    out = {"self_confidence": top_k(sorted(scored, key=lambda row: float(row["p_given_label"])), flipped),
           "normalized_margin": top_k(margin, flipped)}
    flagged = [row["key"] for row in scored if row["flagged"] == "yes"]
    hits = len(set(flagged) & set(flipped))
    out["cleanlab_flagged"] = {"K": len(flagged), "precision": hits / max(len(flagged), 1),
                               "recall": hits / len(flipped)}
    return out


def top_k(ranked_rows, flipped):
    ranked = [row["key"] for row in ranked_rows]
    out = {}
    for multiple in (1, 2, 3):
        k = multiple * len(flipped)
        hits = len(set(ranked[:k]) & set(flipped))
        out[f"K={multiple}x"] = {"K": k, "precision": hits / k, "recall": hits / len(flipped)}
    return out


def planted(args):
    work = Path(args.work)
    truth, n_non_test = plant_noise(work, args.fraction, args.seed)
    arm = work / args.arm
    link_data(arm, NAME, work / "noisy")
    common = [f"randomSeed={args.seed}", "splitFile='split.tsv'", *args.overrides]
    seconds = {}
    if args.reuse and (arm / "proc" / NAME / "imgFilenamesTest.json").exists():
        print(f"reusing step 1's outputs in {arm} (same seed, same splitFile)")
    else:
        seconds["step1"] = run_step("1_prepareData.py", arm, NAME, *common)[0]
    reused = False
    if args.arm == "refined":
        if (arm / "proc" / NAME / "model.pt").exists():
            reused = True
            print(f"reusing {arm / 'proc' / NAME / 'model.pt'} (refined on these noisy labels by an earlier run)")
        else:
            seconds["step2"] = run_step("2_refineDNN.py", arm, NAME, *common)[0]
    else:
        common.append("rf_maxEpochs=0")
    features_path = arm / "proc" / NAME / "features.npy"
    if features_path.exists() and (args.arm == "frozen" or reused):  # the same network on the same images
        print(f"reusing {features_path}")
    else:
        seconds["step3"] = run_step("3_featurizeImages.py", arm, NAME, *common)[0]
    seconds["A6_wall"], stdout = run_step("A6_findLabelIssues.py", arm, NAME, *common)
    seconds["A6"] = a6_seconds(stdout)
    issues = read_issues(arm, NAME)
    scored = {row["key"] for row in issues if row["split"] in ("train", "val")}
    flipped = sorted(set(truth) & scored)  # a flipped image removed as a near-duplicate is not scored
    result = precision_recall(issues, flipped)
    print(f"\nplanted noise, {args.arm} embeddings: {len(flipped)} of {n_non_test} train+val labels flipped "
          f"({len(truth) - len(flipped)} more removed by dedup)")
    for method in ("self_confidence", "normalized_margin"):
        for name, row in result[method].items():
            print(f"   {method:17} top {row['K']:4} ({name}) precision {row['precision']:.3f}  "
                  f"recall {row['recall']:.3f}")
    row = result["cleanlab_flagged"]
    print(f"   cleanlab flagged {row['K']}: precision {row['precision']:.3f}  recall {row['recall']:.3f}")
    print(f"A6 took {seconds['A6']:.1f} s ({seconds['A6_wall']:.1f} s with the interpreter's start-up)")
    fileio.save_json(REPO / "bench" / "results" / f"label_issues_planted_{args.arm}.json", {
        "command": " ".join(["bench/label_issues.py", *sys.argv[1:]]), "arm": args.arm, "seed": args.seed,
        "fraction": args.fraction, "n_train_val": n_non_test, "n_flipped_scored": len(flipped),
        "n_flipped": len(truth), "refined_model_reused": reused, "overrides": args.overrides,
        "seconds": seconds, "load_avg_at_end": os.getloadavg(), "cpu_count": os.cpu_count(), "results": result,
        "flipped_found_at_rank": {key: next(i for i, row in enumerate(
            [r for r in issues if r["split"] in ("train", "val")], 1) if row["key"] == key) for key in flipped}})


FINDER_VARIANTS = {"one 5-fold": dict(n_folds=5), "one 10-fold": dict(n_folds=10),
                   "3 averaged 5-folds": dict(n_folds=5, n_repeats=3), "cosine 15-NN, 5-fold": dict(n_folds=5),
                   "3 averaged 5-folds, C by val log loss": dict(n_folds=5, n_repeats=3)}


class CosineKNNProba(BaseEstimator):
    """Class probabilities from the 15 nearest neighbours by cosine distance (distance-weighted votes)."""

    def __init__(self, n_neighbors=15):
        self.n_neighbors = n_neighbors

    def fit(self, X, y):
        self.knn_ = KNeighborsClassifier(self.n_neighbors, weights="distance", metric="cosine").fit(X, y)
        self.classes_ = self.knn_.classes_
        return self

    def predict_proba(self, X):
        return self.knn_.predict_proba(X)


def variants(args):
    """Finder variants on in-memory plantings of the frozen embeddings, to choose without the reported planting.

    Needs the workDirs of ``real`` (its seeds' step-1 splits and the frozen features of every label). Each planting
    flips 5% of a split's train + validation labels (seeded like ``planted``), C is chosen as A6 does (train fitted,
    validation scored, on the noisy labels), and every variant ranks by self_confidence.
    """
    stored = load_features(Path(args.work) / "frozen_features_all_labels" / "features.npy")
    results = {}
    for split_seed, flip_seed in [tuple(int(v) for v in pair.split("/")) for pair in args.plantings.split(",")]:
        keys = split_keys(Path(args.work) / f"real_{NAME}_seed{split_seed}", NAME)
        non_test = keys["train"] + keys["val"]
        flipped = flip_labels(non_test, args.fraction, flip_seed)
        noisy = {k: flipped.get(k, label_of(k)) for k in non_test}
        xy = {s: (stored.rows(keys[s]), [noisy[k] for k in keys[s]]) for s in ("train", "val")}
        C = rankers_C(xy, flip_seed, criterion="accuracy")
        C_log_loss = rankers_C(xy, flip_seed)
        X, y = stored.rows(non_test), [noisy[k] for k in non_test]
        row = results[f"{split_seed}/{flip_seed}"] = {"C": C, "C_log_loss": C_log_loss}
        for name, settings in FINDER_VARIANTS.items():
            start = time.perf_counter()
            classifier = (CosineKNNProba() if "NN" in name else rankers.ClassProbRanker(
                C=C_log_loss if "log loss" in name else C, random_state=flip_seed))
            proba, classes = label_issues.out_of_fold_probabilities(classifier, X, y, random_state=flip_seed,
                                                                    n_jobs=-1, **settings)
            ranked = [{"key": k, "p_given_label": p} for k, p in
                      zip(non_test, proba[np.arange(len(y)), np.searchsorted(classes, y)])]
            row[name] = top_k(sorted(ranked, key=lambda r: r["p_given_label"]), sorted(flipped))
            row[name]["seconds"] = time.perf_counter() - start
            print(f"planting {split_seed}/{flip_seed} (C = {C:g}; by log loss {C_log_loss:g}) {name:37} "
                  "recall at 1x/2x/3x " + " / ".join(
                f"{row[name][f'K={m}x']['recall']:.3f}" for m in (1, 2, 3)), flush=True)
    print("\nmean recall at K = 2 x flipped over the plantings:")
    for name in FINDER_VARIANTS:
        print(f"   {name:36} {np.mean([r[name]['K=2x']['recall'] for r in results.values()]):.3f}")
    fileio.save_json(REPO / "bench" / "results" / "label_issues_variants_frozen.json", {
        "command": " ".join(["bench/label_issues.py", *sys.argv[1:]]), "fraction": args.fraction,
        "load_avg_at_end": os.getloadavg(), "plantings": results})


def classprob_metrics(features, keys, sets, excluded, C, seed):
    """Refit the class-probability classifier (C as given) without ``excluded``; val/test metrics and accuracy."""
    train = [k for k in keys["train"] if k not in excluded]
    xy = {split: (features.rows(ks), [label_of(k) for k in ks])
          for split, ks in (("train", train), ("val", keys["val"]), ("test", keys["test"]))}
    classprob = rankers.ClassProbRanker(C=C, random_state=seed).fit(*xy["train"])
    built = rankers.build_rankers(classprob_payload={"ranker": classprob})
    out = {}
    for split in ("val", "test"):
        out[split] = {"accuracy": classprob.score(*xy[split])}
        for name in ("classprob_same", "classprob_L2"):
            ranks = evaluation.rank_ranking_sets(built[name], features, sets[split])
            metrics = evaluation.evaluate(ranks, [1, 5])
            out[split][name] = {m: metrics[m] for m in ("top1", "top5", "mean_rank")}
    return out


def rankers_C(xy, seed, criterion="log_loss"):
    """The C that step 4 and A6 choose: the best validation ``criterion`` among svm_classProbCValCandidates."""
    return training.select_classprob_C(*xy["train"], *xy["val"], [0.1, 1.0, 10.0, 100.0], seed, criterion)[0].C


def real(args):
    labels = [label for label in args.labels.split(",") if label]
    name = NAME + (f"_{len(labels)}labels" if labels else "")
    runs, cache = [], Path(args.work) / "frozen_features_all_labels" / "features.npy"
    for seed in [int(s) for s in args.seeds.split(",")]:
        work = Path(args.work) / f"real_{name}_seed{seed}"
        link_data(work, name, DATA)
        common = [f"randomSeed={seed}", "rf_maxEpochs=0", *args.overrides]
        if labels:
            common.append(f"includeLabels={labels!r}")
        run_step("1_prepareData.py", work, name, *common)
        features_path = work / "proc" / name / "features.npy"
        if not features_path.exists() and cache.exists():  # frozen features depend on neither the seed nor the split
            for source in (cache, features.sidecar_path(cache)):
                shutil.copyfile(source, features_path.parent / source.name)
        if not features_path.exists():
            run_step("3_featurizeImages.py", work, name, *common)
        if not labels and not cache.exists():  # every label: a superset any later run can use
            cache.parent.mkdir(parents=True, exist_ok=True)
            for source in (features_path, features.sidecar_path(features_path)):
                shutil.copyfile(source, cache.parent / source.name)
        issues_path = work / "results" / name / "label_issues.csv"
        keys = split_keys(work, name)
        stored = load_features(features_path)
        if args.reuse and issues_path.exists():  # an earlier run's A6 on this seed's split (step 1 is seeded)
            print(f"reusing {issues_path}")
            seconds = None
            xy = {s: (stored.rows(keys[s]), [label_of(k) for k in keys[s]]) for s in ("train", "val")}
            C = rankers_C(xy, seed)
        else:
            _, stdout = run_step("A6_findLabelIssues.py", work, name, *common)
            seconds = a6_seconds(stdout)
            C = float(re.search(r"classifier C = ([0-9.e+-]+)", stdout).group(1))  # A6's choice: step 4's rule
        issues = read_issues(work, name)
        sets = {split: load_ranking_sets(work / "proc" / name / f"imgInfos{split.title()}.json")
                for split in SPLITS}
        train_suspects = [row["key"] for row in issues if row["split"] == "train"]
        effect = {k: classprob_metrics(stored, keys, sets, set(train_suspects[:k]), C, seed) for k in EXCLUDE_KS}
        top20 = [{f: row[f] for f in ("rank", "key", "split", "given_label", "suggested_label", "p_given_label",
                                      "flagged")} for row in issues[:20]]
        runs.append({"seed": seed, "a6_seconds": seconds, "n_flagged": sum(r["flagged"] == "yes" for r in issues),
                     "n_scored": len(issues), "top20": top20, "exclude_top_k_train": effect})
        print(f"\nseed {seed}: top 20 suspects")
        for row in top20:
            print(f"   {row['rank']:>4} {row['key']:28} {row['split']:5} given {row['given_label']:12} "
                  f"suggested {row['suggested_label']:12} p(given) {float(row['p_given_label']):.3f}")
    print(f"\n{name}: excluding the top k training suspects, frozen embeddings (mean ± std over seeds)")
    print(f"{'k':>4} {'val acc':>13} {'val top1':>13} {'test acc':>13} {'test top1':>13} {'test mean rank':>15}"
          "   (top1, mean rank: classprob_same ranker)")
    fields = {"val_accuracy": ("val", "accuracy"), "val_top1": ("val", "top1"), "test_accuracy": ("test", "accuracy"),
              "test_top1": ("test", "top1"), "test_mean_rank": ("test", "mean_rank"),
              "test_top1_classprob_L2": ("test", "top1", "classprob_L2")}
    summary = {}
    for k in EXCLUDE_KS:
        summary[k] = {}
        for field, (split, metric, *ranker) in fields.items():
            rows = [run["exclude_top_k_train"][k][split] for run in runs]
            got = [row[metric] if metric == "accuracy" else row[(ranker or ["classprob_same"])[0]][metric]
                   for row in rows]
            summary[k][field], summary[k][field + "_std"] = float(np.mean(got)), float(np.std(got))
        s = summary[k]
        pct = lambda f: f"{100 * s[f]:5.1f} ± {100 * s[f + '_std']:3.1f}%"  # noqa: E731
        print(f"{k:>4} {pct('val_accuracy'):>13} {pct('val_top1'):>13} {pct('test_accuracy'):>13} "
              f"{pct('test_top1'):>13} {s['test_mean_rank']:8.2f} ± {s['test_mean_rank_std']:4.2f}")
    print("A6 seconds per seed: " + ", ".join(f"{run['a6_seconds']}" for run in runs))
    fileio.save_json(REPO / "bench" / "results" / f"label_issues_real_{name}.json", {
        "command": " ".join(["bench/label_issues.py", *sys.argv[1:]]), "dataset": name, "labels": labels or "all",
        "embeddings": "frozen (pretrained efficientnet_lite0, rf_maxEpochs=0)", "load_avg_at_end": os.getloadavg(),
        "classifier": "ClassProbRanker refitted on train minus the top k train suspects, C chosen by A6 as step 4 does "
                      "(validation log loss, k = 0), validation and test unchanged", "summary": summary, "runs": runs})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("planted", "real", "variants"))
    parser.add_argument("--work", required=True, help="scratch folder for the workDirs (kept: a rerun reuses them)")
    parser.add_argument("--arm", choices=("frozen", "refined"), default="frozen", help="planted: which embeddings")
    parser.add_argument("--fraction", type=float, default=0.05, help="planted: fraction of labels flipped")
    parser.add_argument("--seed", type=int, default=0, help="planted: seed of the split and the flips")
    parser.add_argument("--labels", default="", help="real: comma-separated label folders (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="real: comma-separated seeds")
    parser.add_argument("--plantings", default="1/1,1/101,2/2,2/102",
                        help="variants: comma-separated split seed/flip seed pairs (never the reported seed 0)")
    parser.add_argument("--reuse", action="store_true", help="reuse what an earlier run left in the workDirs (planted: step 1; real: A6)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="PARAMETERS.py override passed to every step (repeatable)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found (the texture set lives in ../shared/datasets/)")
    {"planted": planted, "real": real, "variants": variants}[args.part](args)


if __name__ == "__main__":
    main()
