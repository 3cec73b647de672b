"""Ranking metrics on hand-built cases with known answers, and the ranking helpers on real feature files."""
import numpy as np
import pytest

from image_similarity.pipeline.evaluation import (average_precision, evaluate, mean_rank, mean_reciprocal_rank, median_rank,
                                         positive_rank, rank_ranking_sets, retrieval_metrics, top_k_accuracy)
from image_similarity.data.features import load_features, save_features
from image_similarity.data.splits import RankingSet


def test_positive_rank_counts_closer_negatives():
    distances = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    is_positive = np.array([True, False, False, False, False])
    assert positive_rank(distances, is_positive) == 3  # 0.1 and 0.3 come first


def test_positive_rank_first_and_last():
    assert positive_rank([0.0, 1.0, 2.0], [True, False, False]) == 1
    assert positive_rank([5.0, 1.0, 2.0], [True, False, False]) == 3


def test_ties_are_pessimistic():
    # Two negatives tie with the positive: the positive is counted after both.
    assert positive_rank([0.2, 0.2, 0.2, 0.9], [False, True, False, False]) == 3
    # A constant ranker gets the worst rank, never a lucky first place.
    assert positive_rank(np.zeros(10), np.eye(10, dtype=bool)[4]) == 10


def test_several_positives_the_closest_counts():
    assert positive_rank([0.4, 0.1, 0.3, 0.2], [True, False, False, True]) == 2


@pytest.mark.parametrize("distances, is_positive", [([0.1, 0.2], [False, False]), ([0.1, np.nan], [True, False]),
                                                    ([0.1, 0.2, 0.3], [True, False])])
def test_positive_rank_refuses_bad_input(distances, is_positive):
    with pytest.raises(ValueError):
        positive_rank(distances, is_positive)


def test_top_k_accuracy_rank_three():
    assert top_k_accuracy([3], 4) == 1.0
    assert top_k_accuracy([3], 2) == 0.0
    assert top_k_accuracy([1, 3, 5, 2], 2) == 0.5


def test_mean_median_and_mrr():
    assert median_rank([1, 2, 10]) == 2
    assert mean_rank([1, 2, 10]) == pytest.approx(13 / 3)
    assert mean_reciprocal_rank([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert median_rank([1, 2, 3, 10]) == 2.5


def test_evaluate_all_and_one():
    ranks = np.array([1, 2, 4, 7])
    result = evaluate(ranks, [1, 2, 4, 5])
    assert result == pytest.approx({"top1": 0.25, "top2": 0.5, "top4": 0.75, "top5": 0.75, "mean_rank": 3.5,
                                    "median_rank": 3.0, "mrr": (1 + 0.5 + 0.25 + 1 / 7) / 4, "n_queries": 4})
    assert list(result)[:4] == ["top1", "top2", "top4", "top5"]
    assert evaluate(ranks, [1, 2], metric="mrr") == {"mrr": pytest.approx(result["mrr"])}
    with pytest.raises(ValueError, match="top3"):
        evaluate(ranks, [1, 2], metric="top3")


@pytest.mark.parametrize("ranks", [[], [0, 1], [1.5, 2]])
def test_metrics_refuse_invalid_ranks(ranks):
    with pytest.raises(ValueError):
        mean_rank(np.asarray(ranks))


@pytest.fixture
def stored(tmp_path):
    """Real feature files: a, b, c on one axis at known positions, d far away."""
    keys = ["x/a.jpg", "x/b.jpg", "y/c.jpg", "y/d.jpg"]
    matrix = np.array([[0, 0], [1, 0], [3, 0], [10, 0]], np.float32)
    save_features(tmp_path / "features.npy", keys, matrix, {"model_id": "test:axis", "backbone": "none"})
    return load_features(tmp_path / "features.npy")


class Euclidean:
    """Plain Euclidean distance, unnormalised, so the ranks below can be worked out by hand."""

    def distances(self, queries, references):
        return np.linalg.norm(queries[:, None, :] - references[None, :, :], axis=-1).astype(np.float64)


def test_rank_ranking_sets_on_stored_features(stored):
    sets = [RankingSet("x/a.jpg", "y/c.jpg", ["x/b.jpg", "y/d.jpg"], ["y/d.jpg", "y/c.jpg", "x/b.jpg"]),
            RankingSet("y/d.jpg", "y/c.jpg", ["x/a.jpg"], ["x/a.jpg", "y/c.jpg"])]
    ranks = rank_ranking_sets(Euclidean(), stored, sets)
    assert ranks.tolist() == [2, 1] and ranks.dtype == np.int64


def test_average_precision_by_hand():
    # Positives at ranks 1 and 3: (1/1 + 2/3) / 2.
    assert average_precision([0.1, 0.2, 0.3], [True, False, True]) == pytest.approx(5 / 6)
    assert average_precision([0.3, 0.2, 0.1], [True, False, True]) == pytest.approx(5 / 6)  # same ranking, reversed
    assert average_precision([0.9, 0.1, 0.5], [True, False, False]) == pytest.approx(1 / 3)  # one positive: 1 / rank
    assert average_precision([0.0, 0.5], [True, False]) == 1.0


def test_average_precision_ties_are_pessimistic_and_order_free():
    # A negative at the positive's distance comes first, whichever is listed first.
    assert average_precision([0.2, 0.2], [True, False]) == 0.5
    assert average_precision([0.2, 0.2], [False, True]) == 0.5
    assert average_precision(np.zeros(4), [True, True, False, False]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    with pytest.raises(ValueError):
        average_precision([0.1, 0.2], [False, False])


def test_retrieval_metrics_with_labels_by_hand(stored):
    # On the axis a=0, b=1, c=3, d=10: a, b and d find their label's other image first; c sees b (2) and a (3)
    # before d (7), so its positive is third: recall@1 3/4, mAP (1 + 1 + 1/3 + 1) / 4.
    labels = {key: key.split("/")[0] for key in stored.keys}
    metrics = retrieval_metrics(Euclidean(), stored, stored.keys, labels, ks=(1, 2, 3), batch_size=3)
    assert metrics == pytest.approx({"recall@1": 0.75, "recall@2": 0.75, "recall@3": 1.0, "map": 10 / 12,
                                     "n_queries": 4})


def test_retrieval_metrics_with_groups_by_hand(stored):
    # Group g holds a and c: each sees b (at 1 and 2) before the other (at 3). d's group has no other member and
    # b has none: both are only references.
    groups = {"x/a.jpg": "g", "y/c.jpg": "g", "y/d.jpg": "alone"}
    metrics = retrieval_metrics(Euclidean(), stored, stored.keys, groups, ks=(1, 5))
    assert metrics == {"recall@1": 0.0, "recall@5": 1.0, "map": 0.5, "n_queries": 2}
    assert retrieval_metrics(Euclidean(), stored, stored.keys, {"y/d.jpg": "alone"}) == {}
