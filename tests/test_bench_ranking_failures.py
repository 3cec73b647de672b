"""bench/ranking_failures.py: each query that misses top-1 is put down to the right misclassified image."""
import sys

import numpy as np

from conftest import REPO
from image_similarity.features import Features
from image_similarity.pairs import RankingSet
from image_similarity.rankers import ClassProbRanker

sys.path.insert(0, str(REPO / "bench"))
import ranking_failures  # noqa: E402

# 2-D embeddings: label a near (1, 0), label b near (0, 1); "b/odd" sits among the a's.
POINTS = {"a/1": (1.0, 0.05), "a/2": (1.0, 0.1), "a/3": (1.0, 0.0), "a/4": (0.95, 0.1),
          "b/1": (0.05, 1.0), "b/2": (0.1, 1.0), "b/3": (0.0, 1.0), "b/odd": (1.0, 0.02)}


def test_failures_are_put_down_to_the_misclassified_image():
    keys = list(POINTS)
    features = Features(keys, np.array([POINTS[k] for k in keys], np.float32), {"model_id": "test"})
    classifier = ClassProbRanker(metric="cosine", C=100.0).fit(features.matrix, [k.split("/")[0] for k in keys])
    sets = [RankingSet("a/1", "a/2", ["b/1", "b/odd"], ["a/2", "b/1", "b/odd"]),  # a negative looks like an a
            RankingSet("b/odd", "b/1", ["a/1"], ["b/1", "a/1"]),  # the query is misclassified
            RankingSet("b/2", "b/3", ["a/3"], ["b/3", "a/3"])]  # an easy hit
    misclassified, causes, ranks = ranking_failures.failure_causes(classifier, features, sets)
    assert [(row["key"], row["predicted"]) for row in misclassified] == [("b/odd", "a")]
    assert 0.5 < misclassified[0]["probability"] <= 1.0
    assert ranks[2] == 1 and ranks[0] > 1 and ranks[1] > 1
    assert causes == {"query misclassified": 1, "positive misclassified": 0,
                      "misclassified image among the negatives": 1, "other": 0}
