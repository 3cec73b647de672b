"""Training the learned rankers: pair differences, choosing C, hard-negative mining, one weighted-L2 fit.

Step 4 (``4_trainSvm.py``), the attributes (:meth:`.attributes.AttributeModel.fit`) and the SQL variant train
through these functions, so the tutorial's recipe is written once: a linear SVM on the squared differences of
(query, reference) pairs of the train ranking sets, C chosen by the mean rank of the positive on the validation
ranking sets, optional rounds of hard negatives, and Platt scaling on the validation pairs. The
class-probability classifier's C is chosen by validation log loss (or accuracy), and the hybrid ranker's label band
by validation label mAP among the bands that keep the validation top-1 and mean rank. Nothing here looks at a test
split.
"""
import copy
import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss
from sklearn.preprocessing import normalize
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted

from ..search.distances import check_pair
from .evaluation import mean_rank, rank_ranking_sets, retrieval_metrics, top_k_accuracy
from ..search.rankers import CalibratedRanker, ClassProbRanker, HybridRanker, WeightedL2Ranker
from ..data.splits import label_of

__all__ = ["pair_differences", "ranking_set_pairs", "select_C", "mine_hard_negatives", "WeightedL2Fit",
           "fit_weighted_l2", "pair_accuracies", "C_CRITERIA", "select_classprob_C", "select_hybrid_band"]

logger = logging.getLogger(__name__)


def pair_differences(a, b, l2_normalize=True):
    """Element-wise squared differences of paired embeddings: the weighted-L2 SVM's input.

    Parameters
    ----------
    a, b : ndarray of shape (n_pairs, D), float
    l2_normalize : bool
        Normalise each row to unit L2 norm first.

    Returns
    -------
    ndarray of shape (n_pairs, D), float32
    """
    a, b = check_pair(a, b)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} rows but b has {len(b)}: pairs need equal counts")
    if l2_normalize and len(a):
        a, b = normalize(a), normalize(b)
    return ((a - b) ** 2).astype(np.float32)


def ranking_set_pairs(features, ranking_sets, l2_normalize=True):
    """The (query, reference) pairs of ranking sets as SVM training data.

    Returns
    -------
    pair_diffs : ndarray of shape (n_pairs, D), float32
        :func:`pair_differences` of each query with each of its references.
    same_label : ndarray of shape (n_pairs,), bool
        True for the (query, positive) pairs.
    """
    queries = [s.query for s in ranking_sets for _ in s.references]
    references = [ref for s in ranking_sets for ref in s.references]
    same = np.concatenate([s.is_positive for s in ranking_sets]) if ranking_sets else np.zeros(0, bool)
    return pair_differences(features.rows(queries), features.rows(references), l2_normalize), same


def select_C(train_diffs, train_same, features, val_sets, candidates, l2_normalize=True, random_state=None):
    """Fit one :class:`WeightedL2Ranker` per C and keep the one with the lowest mean positive rank on ``val_sets``.

    The mean rank on the validation ranking sets is what 5_evaluate.py reports (with top-N accuracies), and it is
    smoother than top-1 on a few hundred queries. Ties keep the smaller (more regularised) C.

    Returns
    -------
    best : WeightedL2Ranker
        Fitted with the chosen C.
    table : dict of float to float
        ``{C: validation mean rank}``.
    """
    if not val_sets:
        raise ValueError("no validation ranking sets to choose C on (is ratioValFromTrain 0?)")
    table, best = {}, None
    for C in sorted(candidates):
        ranker = WeightedL2Ranker(C=C, l2_normalize=l2_normalize, random_state=random_state)
        ranker.fit(train_diffs, train_same)
        table[C] = mean_rank(rank_ranking_sets(ranker, features, val_sets))
        logger.debug("C=%g: validation mean rank %.3f", C, table[C])
        if best is None or table[C] < table[best.C]:
            best = ranker
    return best, table


def mine_hard_negatives(ranker, embeddings, labels, n_add, max_pairs, random_state=None):
    """Different-label pairs the current SVM finds hardest, to add to its training set.

    Samples up to ``max_pairs`` distinct random pairs of images with different labels, scores them, and keeps up to
    ``n_add`` of those with the highest scores among the ones inside the SVM's margin (score > -1: misclassified
    as "same label", or not confidently separated). Pairs outside the margin would not change a hinge-loss SVM.

    Parameters
    ----------
    ranker : WeightedL2Ranker, fitted
    embeddings : ndarray of shape (n_images, D), float32
        The training images' embeddings.
    labels : array-like of shape (n_images,)
    n_add, max_pairs : int
    random_state : int, RandomState or None

    Returns
    -------
    ndarray of shape (n_added, D), float32
        Pair differences of the mined negatives, hardest first (n_added <= n_add).
    """
    check_is_fitted(ranker)
    embeddings = check_array(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(embeddings)
    rng = check_random_state(random_state)
    i, j = rng.randint(n, size=max_pairs), rng.randint(n, size=max_pairs)
    codes = np.unique(np.minimum(i, j) * n + np.maximum(i, j))
    i, j = codes // n, codes % n
    keep = labels[i] != labels[j]
    i, j = i[keep], j[keep]
    diffs = pair_differences(embeddings[i], embeddings[j], ranker.l2_normalize)
    if len(diffs) == 0:
        return diffs
    scores = ranker.decision_function(diffs)
    hard = np.flatnonzero(scores > -1.0)
    hard = hard[np.argsort(-scores[hard], kind="stable")][:n_add]
    logger.info("hard negatives: %d of %d sampled different-label pairs are inside the margin, %d added",
                int((scores > -1.0).sum()), len(scores), len(hard))
    return diffs[hard]


@dataclass
class WeightedL2Fit:
    """What :func:`fit_weighted_l2` learnt.

    Attributes
    ----------
    ranker : WeightedL2Ranker
        Fitted with the chosen C (and the mined negatives).
    calibrated : CalibratedRanker
        ``ranker`` Platt-scaled on the validation pairs.
    C_table : dict of float to float
        ``{C: validation mean rank}``.
    mining : list of (int, int)
        Per hard-negative round: pairs added, training pairs after it.
    n_train_pairs : int
        Training pairs of the final fit.
    """

    ranker: WeightedL2Ranker
    calibrated: CalibratedRanker
    C_table: dict
    mining: list = field(default_factory=list)
    n_train_pairs: int = 0

    @property
    def n_hard_negatives(self):
        """Hard negatives added in all rounds."""
        return sum(added for added, _ in self.mining)


def fit_weighted_l2(train_pairs, val_pairs, features, val_sets, C_candidates, l2_normalize=True, neg_pos_ratio=5.0,
                    mine_from=None, n_mining_rounds=0, n_mining_add=5000, max_mining_pairs=100000,
                    random_state=None):
    """The tutorial's weighted L2: choose C, mine hard negatives, refit, Platt-scale on validation.

    Parameters
    ----------
    train_pairs, val_pairs : (ndarray of shape (n_pairs, D), float32; ndarray of shape (n_pairs,), bool)
        :func:`ranking_set_pairs` of the train and validation ranking sets.
    features : features.Features
        Holds every key of ``val_sets``.
    val_sets : list of splits.RankingSet
        C is chosen by the mean rank of their positives (:func:`select_C`).
    C_candidates : list of float
    l2_normalize : bool
        Whether the pair differences were taken on L2-normalised embeddings.
    neg_pos_ratio : float
        The Platt fit weighs the negatives to total this many times the positives.
    mine_from : (ndarray of shape (n_images, D), float32; sequence of labels), optional
        The training images' embeddings and labels, for hard-negative mining.
    n_mining_rounds, n_mining_add, max_mining_pairs : int
        Rounds of :func:`mine_hard_negatives` (0 = none), pairs added per round, different-label pairs scored.
    random_state : int or None
        Seeds the SVM; round ``i`` of the mining is seeded ``random_state + i``.

    Returns
    -------
    WeightedL2Fit
    """
    ranker, table = select_C(*train_pairs, features, val_sets, C_candidates, l2_normalize, random_state)
    diffs, same = train_pairs
    mining = []
    for round_ in range(1, n_mining_rounds + 1):
        hard = mine_hard_negatives(ranker, *mine_from, n_mining_add, max_mining_pairs, random_state + round_)
        diffs = np.vstack([diffs, hard])
        same = np.concatenate([same, np.zeros(len(hard), bool)])
        ranker = clone(ranker).fit(diffs, same)
        mining.append((len(hard), len(same)))
    calibrated = CalibratedRanker(ranker, neg_pos_ratio).fit(*val_pairs)
    return WeightedL2Fit(ranker, calibrated, table, mining, len(same))


def pair_accuracies(ranker, pair_diffs, same_label):
    """Pair classification accuracy of a weighted-L2 SVM: plain and class-balanced (the tutorial's 'accuracy').

    Returns
    -------
    dict
        ``{'accuracy': fraction, 'balanced_accuracy': fraction, 'n_pairs': int}``.
    """
    predicted = ranker.decision_function(pair_diffs) > 0
    return {"accuracy": float(accuracy_score(same_label, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(same_label, predicted)),
            "n_pairs": int(len(same_label))}


C_CRITERIA = ("accuracy", "log_loss")  # what select_classprob_C may keep the best validation score of


def select_classprob_C(X_train, y_train, X_val, y_val, candidates, random_state=None, criterion="log_loss"):
    """Fit one :class:`ClassProbRanker` per C; keep the best validation score (ties: smaller C).

    ``criterion`` is ``'log_loss'`` (how well the probabilities themselves fit the validation labels, which is what
    ranking images by them needs: the ``classprob_*`` and hybrid rankers, and A6) or ``'accuracy'`` (the label
    alone; it often keeps a small C, whose flat probabilities rank same-label images badly).

    Returns
    -------
    best : ClassProbRanker
    table : dict of float to float
        ``{C: validation accuracy}``, or ``{C: minus the validation log loss}`` (higher is better in both).
    """
    if criterion not in C_CRITERIA:
        raise ValueError(f"the C criterion must be one of {', '.join(C_CRITERIA)}, got {criterion!r}")
    table, best = {}, None
    for C in sorted(candidates):
        ranker = ClassProbRanker(C=C, random_state=random_state).fit(X_train, y_train)
        table[C] = (ranker.score(X_val, y_val) if criterion == "accuracy" else
                    -log_loss(y_val, ranker.predict_proba(X_val), labels=ranker.classes_))
        if best is None or table[C] > table[best.C]:
            best = ranker
    return best, table


def select_hybrid_band(classifier, features, val_sets, candidates, max_top1_drop=0.01, max_mean_rank_rise=0.1):
    """The label band of the hybrid ranker with the best validation label mAP among those that keep
    ``classprob_same``'s validation top-1 and mean rank; on a tie, the narrowest.

    Labels come first: the validation ranking sets (one positive of the query's label among negatives of other
    labels) only measure label agreement, which ``classprob_same`` ranks best. A band is admissible when its
    validation top-1 is within ``max_top1_drop`` of ``classprob_same``'s and its mean rank at most
    ``max_mean_rank_rise`` (relative) above it. Top-1 and mean rank often tie on a small validation split (every
    band at 94-100%), so among the admissible bands the label mAP decides (every validation image retrieves the
    others of its label, as step 5's mAP column): it counts every same-label image, not the one positive. Where it
    ties too, validation cannot tell the bands apart, and the narrowest stays closest to ``classprob_same``.
    When none is admissible (one query can be more than a point), the same choice among all the candidates.

    Parameters
    ----------
    classifier : ClassProbRanker, fitted
    features : image_similarity.features.Features
    val_sets : list of RankingSet
        The validation ranking sets (never the test split); their images are the label mAP's gallery.
    candidates : iterable of float
        Band widths, each in (0, 1].
    max_top1_drop : float
        Largest accepted loss of validation top-1, as a fraction (0.01 = 1 point).
    max_mean_rank_rise : float
        Largest accepted rise of the validation mean rank, relative (0.1 = 10%).

    Returns
    -------
    best : HybridRanker
    table : dict
        ``{band: {'top1': fraction, 'mean_rank': float, 'map': float}}`` for every candidate, and
        ``'classprob_same'`` for the label-only ranking it is held to.
    """
    candidates = sorted(set(map(float, candidates)))
    if not candidates:
        raise ValueError("no hybrid band candidates to choose from")
    keys = sorted({key for s in val_sets for key in (s.query, *s.references)})
    labels = {key: label_of(key) for key in keys}
    label_only = copy.deepcopy(classifier).set_params(metric="same_label")
    table = {}
    for name, ranker in [("classprob_same", label_only), *((b, HybridRanker(classifier, b).fit()) for b in candidates)]:
        ranks = rank_ranking_sets(ranker, features, val_sets)
        table[name] = {"top1": top_k_accuracy(ranks, 1), "mean_rank": mean_rank(ranks),
                       "map": retrieval_metrics(ranker, features, keys, labels, ks=()).get("map", 0.0)}
    reference = table["classprob_same"]
    admissible = [b for b in candidates if table[b]["top1"] >= reference["top1"] - max_top1_drop - 1e-12
                  and table[b]["mean_rank"] <= reference["mean_rank"] * (1 + max_mean_rank_rise) + 1e-12]
    # Rounded so that float noise in equal mAPs does not break a tie in favour of a wider band.
    band = max(admissible or candidates, key=lambda b: (round(table[b]["map"], 9), -b))
    return HybridRanker(classifier, band).fit(), table
