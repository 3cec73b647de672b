"""How step 4 should choose the class-probability classifier's C: validation accuracy or validation log loss.

For each workDir that ``bench/accuracy.py --keep`` left (steps 1-3 done), it fits the class-probability classifier
(``rankers.ClassProbRanker``, on the training split) for every C of ``svm_classProbCValCandidates`` and reports
validation accuracy, validation log loss, and the validation and test top-1 and mean rank of ``classprob_same``.
Then the C that each rule keeps (``training.select_classprob_C``), and how often log loss beats, ties or trails
accuracy on validation top-1. Only validation chooses; the test columns are for the record.
Writes ``bench/results/classprob_C.json``.

    .venv/bin/python bench/classprob_C.py /tmp/keep/fridge/seed0 /tmp/keep/tex3/seed0 ...
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import helpers  # noqa: E402
from image_similarity.pipeline import evaluation, training
from image_similarity.data import fileio
from image_similarity.search import rankers  # noqa: E402
from image_similarity.data.features import load_features  # noqa: E402
from image_similarity.data.splits import SPLITS, label_of, load_ranking_sets, split_keys  # noqa: E402


def measure(work, candidates):
    """``{'criteria': {rule: C}, 'by_C': {C: metrics}}`` for one kept workDir."""
    proc = next(p for p in (Path(work) / "proc").iterdir() if (p / "features.npy").exists())
    features = load_features(proc / "features.npy")
    sets = {s: load_ranking_sets(proc / f"imgInfos{s.title()}.json") for s in SPLITS}
    keys = {s: split_keys(proc / f"imgFilenames{s.title()}.json")
            for s in SPLITS}
    xy = {s: (features.rows(keys[s]), [label_of(k) for k in keys[s]]) for s in SPLITS}
    by_C, criteria = {}, {}
    for criterion in training.C_CRITERIA:
        best, table = training.select_classprob_C(*xy["train"], *xy["val"], candidates, 0, criterion)
        criteria[criterion] = best.C
        for C, score in table.items():
            row = by_C.setdefault(C, {})
            row["val_" + criterion] = score if criterion == "accuracy" else -score
            if "val_top1" not in row:
                ranker = rankers.ClassProbRanker(C=C, metric="same_label", random_state=0).fit(*xy["train"])
                for split in ("val", "test"):
                    ranks = evaluation.rank_ranking_sets(ranker, features, sets[split])
                    row[f"{split}_top1"] = evaluation.top_k_accuracy(ranks, 1)
                    row[f"{split}_mean_rank"] = evaluation.mean_rank(ranks)
    return {"criteria": criteria, "by_C": by_C}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", type=Path, help="workDirs kept by bench/accuracy.py --keep")
    args = parser.parse_args()
    candidates = helpers.load_parameters().svm_classProbCValCandidates
    runs, tally = {}, {"better": 0, "equal": 0, "worse": 0}
    for work in args.workdirs:
        run = runs[str(work)] = measure(work, candidates)
        print(f"\n{work}")
        for C, row in run["by_C"].items():
            marks = " ".join(f"<- {rule}" for rule, chosen in run["criteria"].items() if chosen == C)
            print(f"   C = {C:<6g} val accuracy {row['val_accuracy']:.3f}  val log loss {row['val_log_loss']:.3f}  "
                  f"classprob_same val top-1 {100 * row['val_top1']:5.1f}% / mean rank {row['val_mean_rank']:5.2f}"
                  f"  test {100 * row['test_top1']:5.1f}% / {row['test_mean_rank']:5.2f}  {marks}")
        val = {rule: run["by_C"][C]["val_top1"] for rule, C in run["criteria"].items()}
        outcome = ("better" if val["log_loss"] > val["accuracy"] + 1e-12 else
                   "worse" if val["log_loss"] < val["accuracy"] - 1e-12 else "equal")
        run["log_loss_on_val_top1"] = outcome
        tally[outcome] += 1
    print(f"\nclassprob_same validation top-1, C by log loss against C by accuracy, over {len(runs)} runs: "
          f"better on {tally['better']}, equal on {tally['equal']}, worse on {tally['worse']}")
    fileio.save_json(REPO / "bench" / "results" / "classprob_C.json", {
        "command": " ".join(["bench/classprob_C.py", *sys.argv[1:]]), "C_candidates": candidates,
        "tally_log_loss_vs_accuracy_val_top1": tally, "runs": runs})


if __name__ == "__main__":
    main()
