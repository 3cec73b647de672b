"""bench/ranking_failures.py: each query that misses top-1 is put down to the right misclassified image, and
classifying that image right gives the misses back."""
import sys

import numpy as np

from conftest import REPO
from image_similarity.data.features import Features
from image_similarity.search.rankers import ClassProbRanker
from image_similarity.data.splits import RankingSet

sys.path.insert(0, str(REPO / "bench"))
import ranking_failures  # noqa: E402

# 2-D embeddings: label a near (1, 0), label b near (0, 1); "b/odd" sits among the a's.
POINTS = {"a/1": (1.0, 0.05), "a/2": (1.0, 0.1), "a/3": (1.0, 0.0), "a/4": (0.95, 0.1),
          "b/1": (0.05, 1.0), "b/2": (0.1, 1.0), "b/3": (0.0, 1.0), "b/odd": (1.0, 0.02)}


def test_failures_are_put_down_to_the_misclassified_image():
    keys = list(POINTS)
    features = Features(keys, np.array([POINTS[k] for k in keys], np.float32), {"model_id": "test"})
    classifier = ClassProbRanker(C=100.0).fit(features.matrix, [k.split("/")[0] for k in keys])
    sets = [RankingSet("a/1", "a/2", ["b/1", "b/odd"], ["a/2", "b/1", "b/odd"]),  # a negative looks like an a
            RankingSet("b/odd", "b/1", ["a/1"], ["b/1", "a/1"]),  # the query is misclassified
            RankingSet("b/2", "b/3", ["a/3"], ["b/3", "a/3"])]  # an easy hit
    classes = list(classifier.classes_)
    probabilities = ranking_failures.class_probabilities(classifier, features, sets)
    misclassified, causes, ranks = ranking_failures.failure_causes(probabilities, classes, sets, "cosine")
    assert [(row["key"], row["predicted"]) for row in misclassified] == [("b/odd", "a")]
    assert 0.5 < misclassified[0]["probability"] <= 1.0
    assert ranks[2] == 1 and ranks[0] > 1 and ranks[1] > 1
    assert causes == {"query misclassified": 1, "positive misclassified": 0,
                      "misclassified image among the negatives": 1, "other": 0}
    # b/odd spoils both misses: classified right (as surely as it was wrong), every query is at top-1.
    assert misclassified[0]["top1_if_right"] == 1.0
    fixed = ranking_failures.classified_right(probabilities, classes, ["b/odd"])
    assert fixed["b/odd"].tolist() == probabilities["b/odd"][::-1].tolist()  # two labels: the swap reverses them
    assert probabilities["b/odd"].argmax() == classes.index("a")  # and the original is left alone
    assert ranking_failures.positive_ranks(fixed, sets, "cosine").tolist() == [1, 1, 1]
    assert ranking_failures.summary(ranks) == {"top1": 1 / 3, "top5": 1.0, "mean_rank": float(ranks.mean())}
