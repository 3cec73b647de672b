"""Rankers: fixed distances against their definitions, the learned ones on synthetic data where the answer is known."""
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.metrics.pairwise import cosine_distances
from sklearn.preprocessing import normalize

from image_similarity.pipeline.evaluation import mean_rank, positive_rank
from image_similarity.search.rankers import (CalibratedRanker, ClassProbRanker, CosineRanker, HybridRanker,
                                             KReciprocalRanker, L1Ranker, L2Ranker, RandomRanker, WeightedL2Ranker,
                                             build_rankers, negative_sample_weights, ranker_names)
from image_similarity.search.ranker_files import load_payload, save_payload
from image_similarity.pipeline.training import pair_differences


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1)
    return rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(6, 16)).astype(np.float32)


def brute_force(q, r, formula):
    q, r = unit(q.astype(np.float64)), unit(r.astype(np.float64))
    return np.array([[formula(a, b) for b in r] for a in q])


@pytest.mark.parametrize("ranker, formula", [
    (L1Ranker(), lambda a, b: np.abs(a - b).sum()),
    (L2Ranker(), lambda a, b: np.sqrt(((a - b) ** 2).sum())),
    (CosineRanker(), lambda a, b: 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
])
def test_fixed_distances_match_their_definition(vectors, ranker, formula):
    q, r = vectors
    d = ranker.fit().distances(q, r)
    assert d.shape == (4, 6) and d.dtype == np.float64
    np.testing.assert_allclose(d, brute_force(q, r, formula), atol=1e-6)
    np.testing.assert_allclose(ranker.distances(q[:1], q[:1]), 0.0, atol=1e-6)


def test_fixed_distances_refuse_mismatched_dims(vectors):
    q, r = vectors
    with pytest.raises(ValueError, match="dims"):
        L2Ranker().distances(q, r[:, :8])


def test_random_ranker_is_seeded_and_must_be_fitted(vectors):
    q, r = vectors
    with pytest.raises(NotFittedError):
        RandomRanker(0).distances(q, r)
    a, b = RandomRanker(0).fit().distances(q, r), RandomRanker(0).fit().distances(q, r)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 6) and (a >= 0).all() and (a < 1).all()
    assert not np.array_equal(a, RandomRanker(1).fit().distances(q, r))


@pytest.mark.parametrize("ranker", [WeightedL2Ranker(), CalibratedRanker(WeightedL2Ranker().fit(
    np.eye(4), [True, False, False, True])), ClassProbRanker()])
def test_learned_rankers_refuse_use_before_fit(vectors, ranker):
    with pytest.raises(NotFittedError):
        ranker.distances(*vectors)


def make_clusters(n_classes=5, per_class=40, n_signal=4, n_noise=60, seed=0):
    """Labels live in a few low-variance dimensions; most dimensions are high-variance noise."""
    centres = np.random.default_rng(100).normal(scale=1.0, size=(n_classes, n_signal))  # the same in every split
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    signal = centres[labels] + rng.normal(scale=0.1, size=(len(labels), n_signal))
    noise = rng.normal(scale=1.0, size=(len(labels), n_noise))
    return np.hstack([signal, noise]).astype(np.float32), labels


def random_pairs(x, labels, n, rng):
    """n same-label and n different-label pairs."""
    same, diff = [], []
    while len(same) < n or len(diff) < n:
        i, j = rng.integers(len(x), size=2)
        if i != j:
            (same if labels[i] == labels[j] else diff).append((i, j))
    pairs = np.array(same[:n] + diff[:n])
    return pair_differences(x[pairs[:, 0]], x[pairs[:, 1]]), np.repeat([True, False], n)


def ranks_of(ranker, x, labels, rng, n_queries=100, n_negatives=20):
    ranks = []
    for _ in range(n_queries):
        q = rng.integers(len(x))
        pos = rng.choice(np.flatnonzero((labels == labels[q]) & (np.arange(len(x)) != q)))
        neg = rng.choice(np.flatnonzero(labels != labels[q]), n_negatives)
        refs = np.concatenate([[pos], neg])
        ranks.append(positive_rank(ranker.distances(x[[q]], x[refs])[0], np.arange(len(refs)) == 0))
    return np.array(ranks)


@pytest.fixture(scope="module")
def trained():
    x, labels = make_clusters()
    rng = np.random.default_rng(0)
    diffs, same = random_pairs(x, labels, 600, rng)
    ranker = WeightedL2Ranker(C=1.0, random_state=0).fit(diffs, same)
    val_x, val_labels = make_clusters(seed=1)
    val_diffs, val_same = random_pairs(val_x, val_labels, 300, rng)
    return x, labels, ranker, val_diffs, val_same


def test_weighted_l2_beats_plain_l2_when_few_dims_carry_the_label(trained):
    x, labels, ranker, _, _ = trained
    test_x, test_labels = make_clusters(seed=2)
    weighted = mean_rank(ranks_of(ranker, test_x, test_labels, np.random.default_rng(5)))
    plain = mean_rank(ranks_of(L2Ranker(), test_x, test_labels, np.random.default_rng(5)))
    assert weighted < 2.0 and plain > 4.0, (weighted, plain)
    # It learned that the signal dims matter: large differences there mean "different label".
    assert ranker.coef_[:4].mean() < 5 * ranker.coef_[4:].mean() and (ranker.coef_[:4] < 0).all()


def test_weighted_l2_distances_are_the_negative_svm_score(trained):
    x, _, ranker, _, _ = trained
    q, r = x[:3], x[10:15]
    explicit = np.array([[ranker.decision_function(pair_differences(q[[i]], r[[j]]))[0] for j in range(5)]
                         for i in range(3)])
    np.testing.assert_allclose(ranker.distances(q, r), -explicit, rtol=1e-5, atol=1e-5)
    assert ranker.classes_.tolist() == [False, True]


def test_weighted_l2_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        WeightedL2Ranker().fit(np.ones((4, 3)), [True] * 4)


def test_negative_sample_weights_total_the_ratio():
    same = np.array([True] * 3 + [False] * 12)
    weights = negative_sample_weights(same, 5.0)
    assert weights[same].sum() == 3 and weights[~same].sum() == pytest.approx(15.0)


def test_calibrated_probabilities_are_monotone_in_the_score(trained):
    x, _, ranker, val_diffs, val_same = trained
    calibrated = CalibratedRanker(ranker, neg_pos_ratio=5.0).fit(val_diffs, val_same)
    grid = np.linspace(-5, 5, 101)
    p = calibrated.score_to_probability(grid)
    assert (np.diff(p) > 0).all() and p[0] < 0.05 and p[-1] > 0.95
    q, r = x[:3], x[50:60]
    probabilities = calibrated.probabilities(q, r)
    explicit = np.array([[calibrated.calibrator_.predict_proba(pair_differences(q[[i]], r[[j]]))[0, 1]
                          for j in range(10)] for i in range(3)])
    np.testing.assert_allclose(probabilities, explicit, atol=1e-6)
    np.testing.assert_allclose(calibrated.distances(q, r), 1 - probabilities)
    # Ranking by probability is ranking by score.
    np.testing.assert_array_equal(np.argsort(calibrated.distances(q, r), 1), np.argsort(ranker.distances(q, r), 1))


def test_more_weight_on_negatives_lowers_the_probabilities(trained):
    _, _, ranker, val_diffs, val_same = trained
    light = CalibratedRanker(ranker, neg_pos_ratio=1.0).fit(val_diffs, val_same).score_to_probability([0.0])
    heavy = CalibratedRanker(ranker, neg_pos_ratio=20.0).fit(val_diffs, val_same).score_to_probability([0.0])
    assert heavy[0] < light[0]


def test_classprob_ranker_compares_probability_vectors():
    x, labels = make_clusters(n_noise=4)
    names = np.array(["a", "b", "c", "d", "e"])[labels]
    ranker = ClassProbRanker(metric="l2", C=10.0, random_state=0).fit(x, names)
    assert ranker.score(x, names) > 0.95 and ranker.classes_.tolist() == ["a", "b", "c", "d", "e"]
    p = ranker.predict_proba(x[:3])
    np.testing.assert_allclose(p.sum(1), 1.0)
    d = ranker.distances(x[:3], x[100:104])
    expected = np.sqrt(((p[:, None, :] - ranker.predict_proba(x[100:104])[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d, expected, atol=1e-9)
    ranker.set_params(metric="cosine")
    same, other = ranker.distances(x[:1], x[1:2])[0, 0], ranker.distances(x[:1], x[-1:])[0, 0]
    assert 0 <= same < 0.1 < other <= 1
    with pytest.raises(ValueError, match="metric"):
        ranker.set_params(metric="chi2").distances(x[:1], x[:1])


def test_reference_probabilities_are_computed_once_per_matrix_and_never_saved(tmp_path):
    """A service scores every query against one matrix: its probabilities are remembered for that array only."""
    x, labels = make_clusters(n_noise=4)
    names = np.array(["a", "b", "c", "d", "e"])[labels]
    ranker = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(x, names)
    references = x[100:140].copy()
    first = ranker.distances(x[:2], references)
    calls = []
    ranker.predict_proba = lambda X: calls.append(len(X)) or ClassProbRanker.predict_proba(ranker, X)
    np.testing.assert_array_equal(ranker.distances(x[:2], references), first)
    assert calls == [2]  # the queries only: the references' probabilities were remembered
    changed = references.copy()
    changed[:10] = x[:10]
    assert not np.allclose(ranker.distances(x[:2], changed), first)  # another array is computed afresh
    assert calls == [2, 2, 40]
    del ranker.predict_proba
    save_payload(tmp_path / "r.skops", "m", ranker=ranker)
    assert "_reference_memo" not in load_payload(tmp_path / "r.skops", "m")["ranker"].__dict__


def test_classprob_same_label_ranks_same_class_references_first():
    x, labels = make_clusters(n_noise=4)
    ranker = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(x, labels)
    d = ranker.distances(x[:5], x)
    expected = 1 - ranker.predict_proba(x[:5]) @ ranker.predict_proba(x).T
    np.testing.assert_allclose(d, expected, atol=1e-12)
    assert ((d >= 0) & (d <= 1)).all()
    for row, label in zip(d, labels[:5]):
        same, other = row[labels == label], row[labels != label]
        assert np.median(same) < np.median(other)


def test_build_rankers_in_report_order(trained):
    _, _, ranker, val_diffs, val_same = trained
    assert list(build_rankers(random_state=0)) == ["random", "L1", "L2", "cosine", "cosine+colour"]
    x, labels = make_clusters(n_noise=4)
    svm = {"ranker": ranker, "calibrated": CalibratedRanker(ranker).fit(val_diffs, val_same)}
    classprob = {"ranker": ClassProbRanker().fit(x, labels), "hybrid_band": 0.1}
    rankers = build_rankers(svm, classprob, random_state=0)
    assert tuple(rankers) == ranker_names()
    assert rankers["hybrid"].band == 0.1 and rankers["hybrid"].classifier is classprob["ranker"]
    assert "hybrid" not in build_rankers(svm, {"ranker": classprob["ranker"], "hybrid_band": None})
    assert {name: rankers[name].metric for name in ranker_names() if name.startswith("classprob")} == {
        "classprob_L2": "l2", "classprob_cosine": "cosine", "classprob_same": "same_label"}
    assert classprob["ranker"].metric == "l2"  # the payload itself is not changed


# Label a lies along x, label b along y; the third dimension is appearance within a label.
HYBRID_TRAIN = np.array([[1, 0, 0.3], [1, 0, -0.3], [1, 0, 0], [0, 1, 0.3], [0, 1, -0.3], [0, 1, 0]], np.float32)
HYBRID_LABELS = np.array(["a", "a", "a", "b", "b", "b"])


def test_hybrid_ranker_orders_a_label_by_appearance():
    classifier = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(HYBRID_TRAIN, HYBRID_LABELS)
    query = np.array([[1, 0.1, 0.5]], np.float32)
    # Two references of label a: `near` looks like the query, `far` does not but the classifier is surer of it;
    # `other` is label b.
    near, far, other = [1, 0.12, 0.45], [1, 0, -0.5], [0.1, 1, 0.5]
    references = np.array([far, near, other], np.float32)
    label_only = classifier.distances(query, references)[0]
    assert label_only[0] < label_only[1] < label_only[2]  # classprob_same: the surer, unlike one first
    cosine = cosine_distances(normalize(query), normalize(references))[0]
    for band in (0.05, 0.1, 0.2, 0.5):
        hybrid = HybridRanker(classifier, band=band).fit()
        d = hybrid.distances(query, references)[0]
        assert d[1] < d[0] < d[2], band  # the one that looks alike first, the other label still last
        # The printed distances are informative: the two same-label references are far apart, as their looks.
        np.testing.assert_allclose(d[0] - d[1], band * (cosine[0] - cosine[1]) / 2, atol=1e-7)
        # The order does not depend on where the references are listed.
        np.testing.assert_allclose(hybrid.distances(query, references[::-1])[0], d[::-1], atol=1e-12)
    # By hand, band 0.2: max(p) - p . q is 0.076 and 0.093 for far and near (band 0), 0.662 for other (band 3).
    p, q = classifier.predict_proba(query), classifier.predict_proba(references)
    np.testing.assert_allclose(p.max() - p @ q.T, [[0.0756, 0.0933, 0.6624]], atol=1e-4)
    np.testing.assert_allclose(HybridRanker(classifier, 0.2).fit().distances(query, references)[0],
                               0.2 * (np.array([0, 0, 3]) + cosine / 2), atol=1e-7)
    # One band is the cosine alone; a lower band always wins, however the references look.
    np.testing.assert_allclose(HybridRanker(classifier, 1.0).fit().distances(query, references)[0], cosine / 2,
                               atol=1e-7)
    lookalike = np.array([[0.7, 1, 0.9]], np.float32)  # label b, closer to the query than `far` in cosine
    d = HybridRanker(classifier, 0.2).fit().distances(query, np.vstack([far, lookalike]))[0]
    assert cosine_distances(normalize(query), lookalike)[0, 0] < cosine[0] and d[0] < d[1]
    with pytest.raises(NotFittedError):
        HybridRanker(ClassProbRanker()).fit()
    for band in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="band width must be in"):
            HybridRanker(classifier, band).fit().distances(query, references)


def test_hybrid_ranker_puts_the_query_itself_first_when_the_classifier_is_unsure_of_it():
    classifier = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(HYBRID_TRAIN, HYBRID_LABELS)
    unsure = np.array([[0.6, 0.55, 0.5]], np.float32)  # between label a and label b
    sure_a = np.array([[1, 0, -0.5]], np.float32)
    p, q = classifier.predict_proba(unsure), classifier.predict_proba(sure_a)
    assert 0.5 < p.max() < 0.9 and q.max() > p.max()
    # max(p) - p . q alone puts the surer image of the query's label in a lower band than the query itself.
    assert p.max() - p @ q.T < p.max() - p @ p.T - 0.02
    references = np.vstack([sure_a, unsure])
    for band in (0.02, 0.05, 0.2):
        d = HybridRanker(classifier, band).fit().distances(unsure, references)[0]
        assert d[1] < d[0] and d[1] == pytest.approx(0.0, abs=1e-6), band  # the query, at distance 0, first


def test_k_reciprocal_re_ranking_keeps_clusters_and_falls_back_to_the_original_order():
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    points = np.vstack([centre + 0.05 * rng.normal(size=(8, 3)) for centre in centres]).astype(np.float32)
    cluster = np.repeat(np.arange(3), 8)
    queries, references = points[::4], np.delete(points, np.arange(0, len(points), 4), axis=0)
    q_cluster, r_cluster = cluster[::4], np.delete(cluster, np.arange(0, len(points), 4))
    re_ranked = KReciprocalRanker(CosineRanker(), k1=4, k2=2).fit()
    d = re_ranked.distances(queries, references)
    assert d.shape == (len(queries), len(references))
    nearest = np.argsort(d, axis=1, kind="stable")[:, :5]
    assert (r_cluster[nearest] == q_cluster[:, None]).all()  # the 6 same-cluster references lead
    # With all the weight on the original distance, the original order comes back.
    original = CosineRanker().distances(queries, references)
    only_original = KReciprocalRanker(CosineRanker(), k1=4, k2=2, lambda_value=1.0).distances(queries, references)
    assert np.array_equal(np.argsort(only_original, axis=1, kind="stable"), np.argsort(original, axis=1, kind="stable"))
    with pytest.raises(ValueError, match="k1, k2 >= 1"):
        KReciprocalRanker(CosineRanker(), k1=0).distances(queries, references)
