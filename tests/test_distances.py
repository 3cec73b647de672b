"""Distances: embeddings, class probabilities, match probabilities, and the one top-k selection."""
import numpy as np
import pytest

from image_similarity.search.distances import (ProbabilityDistance, cosine_from_similarity, embedding_distances,
                                        from_probability, probability_distances, top_k)


def test_embedding_distances_are_taken_on_normalised_rows():
    q = np.array([[3.0, 4.0]], np.float32)
    r = np.array([[6.0, 8.0], [0.0, 2.0], [-3.0, -4.0]], np.float32)
    np.testing.assert_allclose(embedding_distances(q, r, "l2"), [[0.0, np.sqrt(0.6 ** 2 + 0.2 ** 2), 2.0]], atol=1e-7)
    np.testing.assert_allclose(embedding_distances(q, r, "l1"), [[0.0, 0.8, 2.8]], atol=1e-7)
    np.testing.assert_allclose(embedding_distances(q, r, "cosine"), [[0.0, 0.2, 2.0]], atol=1e-7)
    sims = (q / 5) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosine_from_similarity(sims), embedding_distances(q, r, "cosine"), atol=1e-6)
    with pytest.raises(ValueError, match="metric must be one of 'l1', 'l2', 'cosine', got 'chi2'"):
        embedding_distances(q, r, "chi2")
    with pytest.raises(ValueError, match="queries have 2 dims but references have 3"):
        embedding_distances(q, np.zeros((1, 3)), "l2")


def test_same_label_distance_is_the_probability_of_different_labels():
    p = np.array([[0.9, 0.1, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    q = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    d = probability_distances(p, q, "same_label")
    np.testing.assert_allclose(d, [[1 - 0.82, 1 - 0.5, 1.0], [2 / 3, 2 / 3, 2 / 3]])
    # Cosine prefers the reference shaped like the query; 1 - P(same label) the one surest of the query's labels.
    sure, unsure = np.array([[1.0, 0.0]]), np.array([[0.6, 0.4]])
    query = np.array([[0.6, 0.4]])
    assert probability_distances(query, sure, "same_label") < probability_distances(query, unsure, "same_label")
    assert probability_distances(query, unsure, "cosine") < probability_distances(query, sure, "cosine")
    with pytest.raises(ValueError, match="metric must be one of 'l2', 'cosine', 'same_label', got 'l1'"):
        probability_distances(p, q, "l1")



def test_probability_distance_and_match_probabilities():
    p = np.array([[0.9, 0.1]])
    assert ProbabilityDistance("same_label").distances(p, p)[0, 0] == pytest.approx(1 - 0.82)
    with pytest.raises(ValueError, match="metric must be one of 'l2', 'cosine', 'same_label', got 'l1'"):
        ProbabilityDistance("l1")
    np.testing.assert_allclose(from_probability([[0.25, 1.0]]), [[0.75, 0.0]])


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 20])
def test_top_k_is_a_stable_sort_cut_at_k(k):
    rng = np.random.default_rng(0)
    distances = rng.integers(0, 4, size=(50, 8)).astype(np.float64)  # many ties, at the k-th place too
    expected = np.argsort(distances, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(top_k(distances, k), expected)
    np.testing.assert_array_equal(top_k(distances[3], k), expected[3])


def test_top_k_refuses_a_bad_k():
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        top_k(np.zeros(3), 0)
