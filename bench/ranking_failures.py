"""Why test queries miss top-1: the classifier's mistakes and the ranking sets they spoil, for one finished run.

Reads a workDir that run_pipeline.py (or ``bench/accuracy.py --keep DIR``) left behind. For the class-probability
ranker that step 4 trained, it prints the classifier's accuracy per split, lists the test images it misclassifies
(with the probability of the wrong label) and sorts every test query that misses top-1 into one cause, first match
wins: the query itself is misclassified, the positive is, a misclassified image is among the negatives, or none of
these. Then it asks what the mistakes cost. An image "classified right" keeps its probabilities, with those of the
wrong and the true label swapped, so it is as sure of the truth as it was of the error. Reported: the top-1 if each
misclassified image alone were classified right; the metrics if all of them were; and, with ``--assume-right``, the
metrics if only the listed ones were (for instance the mistakes a person would not make). Prints the numbers and
writes ``bench/results/ranking_failures_<name>.json`` (``--name``, default the datasetName).

    .venv/bin/python bench/accuracy.py ../shared/datasets/fashionTexture11 --labels dotted,striped,leopard --seeds 0 --keep /tmp/tex3
    .venv/bin/python bench/ranking_failures.py /tmp/tex3/seed0 fashionTexture11_3labels
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from image_similarity.search import distances, ranker_files, rankers
from image_similarity.pipeline import evaluation
from image_similarity.data import fileio
from image_similarity.data.features import load_features
from image_similarity.data.splits import label_of, load_ranking_sets

REPO = Path(__file__).resolve().parents[1]
CAUSES = ("query misclassified", "positive misclassified", "misclassified image among the negatives", "other")


def class_probabilities(classifier, features, ranking_sets):
    """Class probabilities of every query and reference: dict of key to ndarray of shape (n_classes,)."""
    keys = sorted({key for s in ranking_sets for key in (s.query, *s.references)})
    return dict(zip(keys, classifier.predict_proba(features.rows(keys))))


def classified_right(probabilities, classes, images):
    """A copy of ``probabilities`` where each of ``images`` has its predicted and true labels' probabilities swapped."""
    swapped = dict(probabilities)
    for key in images:
        p, true, guess = swapped[key].copy(), classes.index(label_of(key)), int(swapped[key].argmax())
        p[[true, guess]] = p[[guess, true]]
        swapped[key] = p
    return swapped


def positive_ranks(probabilities, ranking_sets, metric):
    """Rank of the positive in every ranking set, ranked by ``metric`` (``distances.PROBABILITY_METRICS``).

    Returns
    -------
    ndarray of shape (n_sets,), int
    """
    return np.array([evaluation.positive_rank(distances.probability_distances(
        probabilities[s.query][None], np.array([probabilities[k] for k in s.references]), metric)[0], s.is_positive)
        for s in ranking_sets], dtype=np.int64)


def summary(ranks):
    """Top-1 and top-5 (fractions) and the mean rank of the positive."""
    return {"top1": float(np.mean(ranks == 1)), "top5": float(np.mean(ranks <= 5)), "mean_rank": float(ranks.mean())}


def failure_causes(probabilities, classes, ranking_sets, metric):
    """The misclassified images of ``ranking_sets``, what each one costs, and, per query that misses top-1, why.

    Parameters
    ----------
    probabilities : dict of str to ndarray of shape (n_classes,)
        From :func:`class_probabilities`.
    classes : list of str
        The label of each probability column.
    ranking_sets : list of splits.RankingSet
    metric : str
        The class-probability ranker's metric.

    Returns
    -------
    misclassified : list of dict
        Per wrongly classified image, sorted by key: ``{"key", "label", "predicted", "probability",
        "top1_if_right"}``; the last is the fraction of queries at top-1 if only this image were classified right.
    causes : dict of str to int
        Queries missing top-1 per cause (:data:`CAUSES`).
    ranks : ndarray of shape (n_sets,), int
    """
    misclassified = [{"key": key, "label": label_of(key), "predicted": str(classes[p.argmax()]),
                      "probability": round(float(p.max()), 3)}
                     for key, p in sorted(probabilities.items()) if classes[p.argmax()] != label_of(key)]
    for row in misclassified:
        fixed = positive_ranks(classified_right(probabilities, classes, [row["key"]]), ranking_sets, metric)
        row["top1_if_right"] = float(np.mean(fixed == 1))
    wrong = {row["key"] for row in misclassified}
    ranks = positive_ranks(probabilities, ranking_sets, metric)
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
    parser.add_argument("--assume-right", default="", metavar="KEY,KEY",
                        help="misclassified test images (label/file) to count as classified right, comma-separated")
    parser.add_argument("--name", help="names the JSON file (default: the datasetName)")
    args = parser.parse_args()
    if args.name is not None and (not args.name or Path(args.name).name != args.name):
        parser.error(f"--name {args.name!r}: give a plain file-name part, without a folder")
    proc = args.work_dir / "proc" / args.dataset
    for needed in ("features.npy", "classprob.skops", "imgInfosTest.json"):
        if not (proc / needed).is_file():
            sys.exit(f"error: {proc / needed} is missing: run the pipeline (steps 1-4) in that workDir first")
    features = load_features(proc / "features.npy")
    payload = ranker_files.load_payload(proc / "classprob.skops", features.meta["model_id"])
    classifier, accuracy = payload["ranker"], payload["accuracy"]
    metric = rankers.CLASSPROB_METRICS[args.ranker]
    ranking_sets = load_ranking_sets(proc / "imgInfosTest.json")
    classes = list(classifier.classes_)
    probabilities = class_probabilities(classifier, features, ranking_sets)
    misclassified, causes, ranks = failure_causes(probabilities, classes, ranking_sets, metric)
    wrong = [row["key"] for row in misclassified]
    assumed = [key for key in args.assume_right.split(",") if key]
    if set(assumed) - set(wrong):
        parser.error(f"--assume-right: {', '.join(sorted(set(assumed) - set(wrong)))} "
                     "is not a misclassified test image of this run")

    print("class-probability classifier accuracy: " + ", ".join(f"{split} {value:.1%}" for split, value in
                                                                accuracy.items()))
    print(f"{len(misclassified)} of the {len(probabilities)} test images in the ranking sets are misclassified:")
    for row in misclassified:
        print(f"   {row['key']:40} {row['label']:>12} -> {row['predicted']:12} p = {row['probability']:.3f}"
              f"   top-1 if right {row['top1_if_right']:.1%}")
    print(f"{args.ranker}: top-1 {np.mean(ranks == 1):.1%} of {len(ranks)} queries, "
          f"mean rank {ranks.mean():.2f}; queries missing top-1 by cause:")
    for cause, count in causes.items():
        print(f"   {count:4d}  {cause}")
    def summary_if_right(images):
        return summary(positive_ranks(classified_right(probabilities, classes, images), ranking_sets, metric))

    scenarios = {"as_is": summary(ranks)}
    if assumed:
        scenarios["if_assumed_right"] = summary_if_right(assumed)
    scenarios["if_all_classified_right"] = summary_if_right(wrong)
    for scenario, m in scenarios.items():
        print(f"{scenario.replace('_', ' '):24} top-1 {m['top1']:.1%}, top-5 {m['top5']:.1%}, "
              f"mean rank {m['mean_rank']:.2f}")
    out = REPO / "bench" / "results" / f"ranking_failures_{args.name or args.dataset}.json"
    fileio.save_json(out, {"command": " ".join(["bench/ranking_failures.py", *sys.argv[1:]]),
                           "ranker": args.ranker, "classifier_accuracy": accuracy,
                           "n_test_images": len(probabilities), "n_queries": len(ranks),
                           "top1": scenarios["as_is"]["top1"], "mean_rank": scenarios["as_is"]["mean_rank"],
                           "misclassified": misclassified, "queries_missing_top1_by_cause": causes,
                           "assumed_right": assumed, **scenarios})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
