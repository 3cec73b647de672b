"""Training the learned rankers: hard negatives, pair accuracies, the one weighted-L2 fit."""
import numpy as np
import pytest
from sklearn.metrics import log_loss

from image_similarity.data.features import Features
from image_similarity.search.rankers import ClassProbRanker, WeightedL2Ranker
from image_similarity.data.splits import RankingSet, make_ranking_sets
from image_similarity.pipeline.training import (fit_weighted_l2, mine_hard_negatives, pair_accuracies, ranking_set_pairs,
                                       select_C, select_classprob_C, select_hybrid_band)
from test_rankers import HYBRID_LABELS, HYBRID_TRAIN, make_clusters, random_pairs, trained  # noqa: F401 (a fixture)


def test_hard_negative_mining_adds_the_hardest_different_label_pairs():
    x, labels = make_clusters(seed=3)
    rng = np.random.default_rng(0)
    diffs, same = random_pairs(x, labels, 30, rng)
    weak = WeightedL2Ranker(C=0.001, random_state=0).fit(diffs, same)
    mined = mine_hard_negatives(weak, x, labels, n_add=50, max_pairs=5000, random_state=0)
    assert 0 < len(mined) <= 50 and mined.shape[1] == x.shape[1]
    scores = weak.decision_function(mined)
    assert (scores > -1).all() and (np.diff(scores) <= 1e-12).all()  # inside the margin, hardest first
    again = mine_hard_negatives(weak, x, labels, n_add=50, max_pairs=5000, random_state=0)
    np.testing.assert_array_equal(mined, again)
    refit = WeightedL2Ranker(C=0.001, random_state=0).fit(np.vstack([diffs, mined]),
                                                          np.concatenate([same, np.zeros(len(mined), bool)]))
    assert (refit.decision_function(mined) < scores).mean() > 0.9


def test_hard_negative_mining_with_one_label_finds_nothing(trained):
    x, _, ranker, _, _ = trained
    assert len(mine_hard_negatives(ranker, x[:20], np.zeros(20), 10, 100, random_state=0)) == 0


def test_pair_accuracies(trained):
    _, _, ranker, val_diffs, val_same = trained
    acc = pair_accuracies(ranker, val_diffs, val_same)
    assert 0.9 < acc["balanced_accuracy"] <= 1 and 0.9 < acc["accuracy"] <= 1 and acc["n_pairs"] == len(val_same)


def test_fit_weighted_l2_chooses_C_on_validation_mines_and_calibrates():
    x, labels = make_clusters(per_class=12)
    keys = [f"{label}/{i}.jpg" for i, label in enumerate(labels)]
    store = Features(keys, x, {})
    by_label = {str(label): [k for k in keys if k.startswith(f"{label}/")] for label in set(labels)}
    train_keys = {label: ks[:8] for label, ks in by_label.items()}
    val_keys = {label: ks[8:] for label, ks in by_label.items()}
    train_sets, val_sets = make_ranking_sets(train_keys, 8, 10, 0), make_ranking_sets(val_keys, 4, 10, 1)
    train, val = ranking_set_pairs(store, train_sets), ranking_set_pairs(store, val_sets)
    train_x = store.rows([k for ks in train_keys.values() for k in ks])
    train_labels = [k.split("/")[0] for ks in train_keys.values() for k in ks]
    fit = fit_weighted_l2(train, val, store, val_sets, [0.01, 1.0], mine_from=(train_x, train_labels),
                          n_mining_rounds=2, n_mining_add=20, max_mining_pairs=500, random_state=0)
    chosen, table = select_C(*train, store, val_sets, [0.01, 1.0], random_state=0)
    assert fit.C_table == table and fit.ranker.C == chosen.C
    assert len(fit.mining) == 2 and fit.n_train_pairs == len(train[1]) + fit.n_hard_negatives
    assert fit.mining[-1][1] == fit.n_train_pairs and all(0 <= added <= 20 for added, _ in fit.mining)
    probabilities = fit.calibrated.probabilities(x[:3], x[:3])
    assert ((0 <= probabilities) & (probabilities <= 1)).all() and fit.calibrated.ranker is fit.ranker
    plain = fit_weighted_l2(train, val, store, val_sets, [chosen.C], random_state=0)
    np.testing.assert_array_equal(plain.ranker.coef_, WeightedL2Ranker(C=chosen.C, random_state=0).fit(*train).coef_)


def test_hybrid_band_keeps_validation_top1_and_mean_rank_and_ties_to_the_narrowest():
    classifier = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(HYBRID_TRAIN, HYBRID_LABELS)
    # The positive has the query's label but looks unlike it; the negative has the other label and looks alike.
    # Worked out by hand: max(p) - p . q is 0.076 for the positive, 0.467 for the look-alike, and their cosine
    # distances are 0.402 and 0.266. Bands up to 0.4 put them in different bands (positive first); from 0.5 both
    # share band 0 and the look-alike wins on looks.
    keys = ["a/query.jpg", "a/positive.jpg", "b/lookalike.jpg"]
    features = Features(keys, np.array([[1, 0.1, 0.5], [1, 0, -0.5], [0.7, 1, 0.9]], np.float32), {})
    val_sets = [RankingSet(keys[0], keys[1], [keys[2]], [keys[2], keys[1]])]
    best, table = select_hybrid_band(classifier, features, val_sets, [1.0, 0.1, 0.5, 0.3])
    assert list(table) == ["classprob_same", 0.1, 0.3, 0.5, 1.0]
    assert [table[b]["top1"] for b in table] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert [table[b]["mean_rank"] for b in table] == [1.0, 1.0, 1.0, 2.0, 2.0]
    # Label mAP over the three images (the look-alike has no partner, so it only is a reference): the two a images
    # find each other first up to 0.4 (AP 1 each); from 0.5 the query finds the look-alike first (AP 0.5), while the
    # positive still finds the query first (AP 1).
    assert [table[b]["map"] for b in table] == [1.0, 1.0, 1.0, 0.75, 0.75]
    # 0.1 and 0.3 tie on every validation number: validation cannot tell them apart, so the narrowest is kept.
    assert best.band == 0.1
    # The mean rank counts too: with any top-1 accepted, a 10% rise of the mean rank is still refused.
    assert select_hybrid_band(classifier, features, val_sets, [0.4, 0.5, 1.0], max_top1_drop=1.0)[0].band == 0.4
    # None keeps the top-1: the best label mAP of them all, then the narrowest.
    assert select_hybrid_band(classifier, features, val_sets, [0.5, 1.0])[0].band == 0.5


def test_hybrid_band_with_the_best_validation_label_map_wins_over_a_wider_one():
    classifier = ClassProbRanker(metric="same_label", C=10.0, random_state=0).fit(HYBRID_TRAIN, HYBRID_LABELS)
    # As above, plus an a image the classifier leans to b on (p = 0.48 / 0.52) that looks like the positive.
    # From it, max(p) - p . q is 0.035 for the positive and 0.015 for the look-alike: classprob_same ranks the
    # look-alike first, and so does band 0.02; from 0.05 both share band 0, where the positive is far closer by
    # cosine (0.24 against 0.76). From the query, the unsure image is 0.394 away and the look-alike 0.467: band 0.3
    # puts both in band 1, where the look-alike's looks win, so 0.3 keeps top-1 but loses label mAP.
    keys = ["a/query.jpg", "a/positive.jpg", "b/lookalike.jpg", "a/unsure.jpg"]
    features = Features(keys, np.array([[1, 0.1, 0.5], [1, 0, -0.5], [0.7, 1, 0.9], [0.5, 0.53, -0.6]],
                                       np.float32), {})
    val_sets = [RankingSet(keys[0], keys[1], [keys[2]], [keys[2], keys[1]]),
                RankingSet(keys[3], keys[1], [keys[2]], [keys[2], keys[1]])]
    best, table = select_hybrid_band(classifier, features, val_sets, [0.02, 0.05, 0.1, 0.3, 0.5])
    assert [table[b]["top1"] for b in table] == [0.5, 0.5, 1.0, 1.0, 1.0, 0.5]
    assert [round(table[b]["map"], 3) for b in table] == [0.861, 0.861, 1.0, 1.0, 0.944, 0.861]
    # 0.3 is admissible and the widest (the old rule's choice); 0.05 and 0.1 share the best label mAP.
    assert best.band == 0.05


def test_classprob_C_by_log_loss_separates_what_accuracy_ties():
    X_train, y_train = make_clusters(n_classes=3, per_class=30, n_noise=1, seed=1)
    X_val, y_val = make_clusters(n_classes=3, per_class=20, n_noise=1, seed=2)
    candidates = [1.0, 10.0, 100.0]
    by_accuracy, accuracy = select_classprob_C(X_train, y_train, X_val, y_val, candidates, 0, "accuracy")
    by_log_loss, minus_log_loss = select_classprob_C(X_train, y_train, X_val, y_val, candidates, 0)  # the default
    # Separable clusters: every C classifies validation perfectly, so accuracy keeps the smallest C; the log loss
    # sees that a larger C makes surer, still correct, probabilities.
    assert set(accuracy.values()) == {1.0} and by_accuracy.C == 1.0
    for C, value in minus_log_loss.items():
        refit = ClassProbRanker(C=C, random_state=0).fit(X_train, y_train)
        assert value == pytest.approx(-log_loss(y_val, refit.predict_proba(X_val), labels=refit.classes_))
    assert by_log_loss.C == max(minus_log_loss, key=minus_log_loss.get) != 1.0
    with pytest.raises(ValueError, match="C criterion must be one of accuracy, log_loss"):
        select_classprob_C(X_train, y_train, X_val, y_val, candidates, 0, "f1")
