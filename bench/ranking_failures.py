"""Why test queries miss top-1: the classifier's mistakes and the ranking sets they spoil, for one finished run.

Reads a workDir that run_pipeline.py (or ``bench/accuracy.py --keep DIR``) left behind. For the class-probability
ranker that step 4 trained, it prints the classifier's accuracy per split and lists the test images it misclassifies (with the probability of the wrong label) and
sorts every test query that misses top-1 into one cause, first match wins: the query itself is misclassified, the
positive is, a misclassified image is among the negatives, or none of these. Prints the numbers and writes
``bench/results/ranking_failures_<datasetName>.json``.

    .venv/bin/python bench/accuracy.py ../shared/datasets/fashionTexture11 --labels dotted,striped,leopard --seeds 0 --keep /tmp/tex3
    .venv/bin/python bench/ranking_failures.py /tmp/tex3/seed0 fashionTexture11_3labels
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from image_similarity import evaluation, fileio, pairs, rankers
from image_similarity.features import load_features

REPO = Path(__file__).resolve().parents[1]
CAUSES = ("query misclassified", "positive misclassified", "misclassified image among the negatives", "other")


def failure_causes(classifier, features, ranking_sets):
    """The misclassified images of ``ranking_sets`` and, per query that misses top-1, why.

    Parameters
    ----------
    classifier : rankers.ClassProbRanker
        Fitted; ranks with its own ``metric``.
    features : image_similarity.features.Features
    ranking_sets : list of pairs.RankingSet

    Returns
    -------
    misclassified : list of dict
        ``{"key", "label", "predicted", "probability"}`` per wrongly classified image, sorted by key.
    causes : dict of str to int
        Queries missing top-1 per cause (:data:`CAUSES`).
    ranks : ndarray of shape (n_sets,), int
    """
    keys = sorted({key for s in ranking_sets for key in (s.query, *s.references)})
    probabilities = classifier.predict_proba(features.rows(keys))
    predicted = classifier.classes_[probabilities.argmax(1)]
    misclassified = [{"key": key, "label": pairs.label_of(key), "predicted": str(guess),
                      "probability": round(float(p.max()), 3)}
                     for key, guess, p in zip(keys, predicted, probabilities) if guess != pairs.label_of(key)]
    wrong = {row["key"] for row in misclassified}
    ranks = evaluation.rank_ranking_sets(classifier, features, ranking_sets)
    causes = Counter({cause: 0 for cause in CAUSES})
    for ranking_set, rank in zip(ranking_sets, ranks):
        if rank > 1:
            causes[CAUSES[0] if ranking_set.query in wrong else CAUSES[1] if ranking_set.positive in wrong else
                   CAUSES[2] if wrong.intersection(ranking_set.negatives) else CAUSES[3]] += 1
    return misclassified, dict(causes), ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir", type=Path, help="the workDir of a finished run")
    parser.add_argument("dataset", help="its datasetName")
    parser.add_argument("--ranker", default="classprob_cosine", choices=list(rankers.CLASSPROB_METRICS),
                        help="the class-probability ranker to explain (default: classprob_cosine)")
    args = parser.parse_args()
    proc = args.work_dir / "proc" / args.dataset
    for needed in ("features.npy", "classprob.pickle", "imgInfosTest.pickle"):
        if not (proc / needed).is_file():
            sys.exit(f"error: {proc / needed} is missing: run the pipeline (steps 1-4) in that workDir first")
    features = load_features(proc / "features.npy")
    payload = rankers.load_payload(proc / "classprob.pickle", features.meta["model_id"])
    classifier, accuracy = payload["ranker"], payload["accuracy"]
    classifier.metric = rankers.CLASSPROB_METRICS[args.ranker]
    ranking_sets = fileio.load_pickle(proc / "imgInfosTest.pickle")
    misclassified, causes, ranks = failure_causes(classifier, features, ranking_sets)

    n_images = len({key for s in ranking_sets for key in (s.query, *s.references)})
    print("class-probability classifier accuracy: " + ", ".join(f"{split} {value:.1%}" for split, value in
                                                                accuracy.items()))
    print(f"{len(misclassified)} of the {n_images} test images in the ranking sets are misclassified:")
    for row in misclassified:
        print(f"   {row['key']:40} {row['label']:>12} -> {row['predicted']:12} p = {row['probability']:.3f}")
    print(f"{args.ranker}: top-1 {np.mean(ranks == 1):.1%} of {len(ranks)} queries, "
          f"mean rank {ranks.mean():.2f}; queries missing top-1 by cause:")
    for cause, count in causes.items():
        print(f"   {count:4d}  {cause}")
    out = REPO / "bench" / "results" / f"ranking_failures_{args.dataset}.json"
    fileio.save_json(out, {"command": " ".join(["bench/ranking_failures.py", *sys.argv[1:]]),
                           "ranker": args.ranker, "classifier_accuracy": accuracy,
                           "n_test_images": n_images,
                           "n_queries": len(ranks), "top1": float(np.mean(ranks == 1)),
                           "mean_rank": float(ranks.mean()), "misclassified": misclassified,
                           "queries_missing_top1_by_cause": causes})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
