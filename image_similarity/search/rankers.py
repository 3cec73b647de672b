"""Rankers: distances between image embeddings, fixed (L1, L2, cosine) or learned (weighted L2, class probabilities).

Every ranker follows the scikit-learn estimator contract: ``__init__`` only stores hyperparameters, ``fit`` learns
and returns ``self``, a learned ranker used before ``fit`` raises ``NotFittedError``. Every ranker has
``distances(queries, references)``: ``queries`` (n_q, D) float32, ``references`` (n_r, D), result (n_q, n_r)
float64, lower is more similar, computed for all pairs in one vectorised call.

The learned weighted L2 is the tutorial's: a linear SVM on the element-wise squared difference of two
L2-normalised embeddings learns which dimensions matter for "same label"; its decision score is a similarity,
so the distance is the negative score. Platt scaling (``CalibratedClassifierCV``) on the validation pairs turns
the score into a probability of "same label". The formulas live in :mod:`.distances`; choosing C, mining hard
negatives and the whole weighted-L2 fit in :mod:`.training`.
"""
import copy
import warnings
import weakref

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from .colour import ColourCosineRanker
from .distances import (check_pair, embedding_distances, from_probability, k_reciprocal, label_then_appearance,
                        probability_distances)

__all__ = ["RandomRanker", "L1Ranker", "L2Ranker", "CosineRanker", "WeightedL2Ranker", "CalibratedRanker",
           "ClassProbRanker", "HybridRanker", "KReciprocalRanker", "CLASSPROB_METRICS", "negative_sample_weights",
           "register_ranker", "ranker_names", "build_rankers", "DEFAULT_COLOUR_WEIGHT"]

# The colour share of the "cosine+colour" ranker: the least that keeps plain white and black apart
# (tests/test_colour.py); its cost: bench/colour_weight.py.
DEFAULT_COLOUR_WEIGHT = 0.3
# ClassProbRanker's metric for each class-probability ranker name.
CLASSPROB_METRICS = {"classprob_L2": "l2", "classprob_cosine": "cosine", "classprob_same": "same_label"}


class _FixedRanker(BaseEstimator):
    """A distance with nothing to learn: ``fit`` does nothing, ``distances`` is ``distances.embedding_distances``."""

    def fit(self, X=None, y=None):
        """Nothing to learn; returns self so every ranker can be driven the same way."""
        return self

    def __sklearn_is_fitted__(self):
        return True

    def distances(self, queries, references):
        """Distances of every query to every reference.

        Parameters
        ----------
        queries : ndarray of shape (n_q, D), float32
        references : ndarray of shape (n_r, D), float32

        Returns
        -------
        ndarray of shape (n_q, n_r), float64
            Lower is more similar; computed on L2-normalised rows.
        """
        return embedding_distances(queries, references, self.metric)


class L1Ranker(_FixedRanker):
    """Manhattan distance between L2-normalised embeddings."""

    metric = "l1"


class L2Ranker(_FixedRanker):
    """Euclidean distance between L2-normalised embeddings."""

    metric = "l2"


class CosineRanker(_FixedRanker):
    """One minus the cosine similarity, in [0, 2]; searched by a cosine index (``core.search``)."""

    metric = "cosine"

    def index_vectors(self, rows):
        """The vectors a cosine index holds for these embeddings: the embeddings, (n, D) float32."""
        return np.asarray(rows, dtype=np.float32)


class RandomRanker(BaseEstimator):
    """The chance baseline: uniform random distances in [0, 1).

    Parameters
    ----------
    random_state : int, RandomState or None
        Seeds the generator that ``fit`` creates; every ``distances`` call draws new numbers from it.
    """

    def __init__(self, random_state=None):
        self.random_state = random_state

    def fit(self, X=None, y=None):
        """Create the random generator from ``random_state``; returns self."""
        self.random_state_ = check_random_state(self.random_state)
        return self

    def distances(self, queries, references):
        """ndarray of shape (n_q, n_r), float64, uniform in [0, 1); the embeddings only give the shape."""
        check_is_fitted(self)
        queries, references = check_pair(queries, references)
        return self.random_state_.random_sample((len(queries), len(references)))


def negative_sample_weights(same_label, neg_pos_ratio):
    """Sample weights making the negatives weigh ``neg_pos_ratio`` times the positives in total.

    Returns
    -------
    ndarray of shape (n_pairs,), float64
        1 for each positive; ``neg_pos_ratio * n_pos / n_neg`` for each negative.
    """
    same_label = np.asarray(same_label, dtype=bool)
    n_pos, n_neg = int(same_label.sum()), int((~same_label).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need positives and negatives to weigh, got {n_pos} and {n_neg}")
    return np.where(same_label, 1.0, neg_pos_ratio * n_pos / n_neg)


class WeightedL2Ranker(BaseEstimator):
    """Weighted squared L2 distance learned by a linear SVM on pair differences.

    Parameters
    ----------
    C : float
        The SVM's slack penalty (``LinearSVC(C, class_weight='balanced')``).
    l2_normalize : bool
        Whether the training pair differences were taken on L2-normalised embeddings; ``distances`` does the same.
    random_state : int, RandomState or None
        Passed to ``LinearSVC``.

    Attributes
    ----------
    svm_ : LinearSVC
    coef_ : ndarray of shape (D,), float64
        One weight per dimension (negative where a large difference means "different label").
    intercept_ : float
    classes_ : ndarray ``[False, True]``
        "Same label" is the positive class.
    """

    def __init__(self, C=1.0, l2_normalize=True, random_state=None):
        self.C = C
        self.l2_normalize = l2_normalize
        self.random_state = random_state

    def fit(self, pair_diffs, same_label):
        """Fit the SVM on pair differences (n_pairs, D) float32 and labels (n_pairs,) bool; returns self."""
        X, y = check_X_y(pair_diffs, same_label, dtype=np.float64)
        y = y.astype(bool)
        if y.all() or not y.any():
            raise ValueError("same_label must hold both same-label (True) and different-label (False) pairs")
        self.svm_ = LinearSVC(C=self.C, class_weight="balanced", random_state=self.random_state).fit(X, y)
        self.coef_ = self.svm_.coef_[0].astype(np.float64)
        self.intercept_ = float(self.svm_.intercept_[0])
        self.classes_ = self.svm_.classes_
        return self

    def decision_function(self, pair_diffs):
        """SVM score of each pair, (n_pairs,) float64: higher means more likely the same label."""
        check_is_fitted(self)
        return self.svm_.decision_function(check_array(pair_diffs, dtype=np.float64))

    def scores(self, queries, references):
        """The SVM score of every (query, reference) pair, (n_q, n_r) float64, without building the differences.

        Uses ``sum_d w_d (q_d - r_d)^2 = (q^2) w + (r^2) w - 2 (q * w) r^T``.
        """
        check_is_fitted(self)
        q, r = check_pair(queries, references)
        if q.shape[1] != self.coef_.size:
            raise ValueError(f"the SVM was fitted on {self.coef_.size}-dim embeddings, got {q.shape[1]} dims")
        if self.l2_normalize:
            q, r = normalize(q), normalize(r)
        w = self.coef_
        return ((q ** 2) @ w)[:, None] + ((r ** 2) @ w)[None, :] - 2.0 * (q * w) @ r.T + self.intercept_

    def distances(self, queries, references):
        """Negative SVM score, (n_q, n_r) float64: lower is more similar."""
        return -self.scores(queries, references)


class CalibratedRanker(BaseEstimator):
    """Platt scaling of a fitted :class:`WeightedL2Ranker`: distance = 1 - P(same label).

    Parameters
    ----------
    ranker : WeightedL2Ranker
        Already fitted; it is frozen, not refitted.
    neg_pos_ratio : float
        The negatives are weighted to total this many times the positives (see :func:`negative_sample_weights`).

    Attributes
    ----------
    calibrator_ : CalibratedClassifierCV
        ``method='sigmoid'`` around ``FrozenEstimator(ranker.svm_)``.
    classes_ : ndarray ``[False, True]``
    """

    def __init__(self, ranker=None, neg_pos_ratio=5.0):
        self.ranker = ranker
        self.neg_pos_ratio = neg_pos_ratio

    def fit(self, pair_diffs, same_label):
        """Fit the sigmoid on (validation) pair differences (n_pairs, D) and labels (n_pairs,) bool; returns self."""
        check_is_fitted(self.ranker)
        X, y = check_X_y(pair_diffs, same_label, dtype=np.float64)
        y = y.astype(bool)
        self.calibrator_ = CalibratedClassifierCV(FrozenEstimator(self.ranker.svm_), method="sigmoid")
        with warnings.catch_warnings():
            # The frozen SVM is deliberately not refitted, so the weights only reach the sigmoid: what we want.
            warnings.filterwarnings("ignore", message="Since FrozenEstimator does not appear to accept sample_weight")
            self.calibrator_.fit(X, y, sample_weight=negative_sample_weights(y, self.neg_pos_ratio))
        self.classes_ = self.calibrator_.classes_
        return self

    def score_to_probability(self, scores):
        """P(same label) for SVM scores of any shape, float64 in [0, 1], increasing in the score."""
        check_is_fitted(self)
        scores = np.asarray(scores, dtype=np.float64)
        sigmoid = self.calibrator_.calibrated_classifiers_[0].calibrators[0]
        return sigmoid.predict(scores.ravel()).reshape(scores.shape)

    def probabilities(self, queries, references):
        """P(same label) of every (query, reference) pair, (n_q, n_r) float64."""
        check_is_fitted(self)
        return self.score_to_probability(self.ranker.scores(queries, references))

    def distances(self, queries, references):
        """1 - P(same label), (n_q, n_r) float64 in [0, 1]."""
        return from_probability(self.probabilities(queries, references))


class ClassProbRanker(BaseEstimator):
    """Distance between class-probability vectors from a logistic regression on the embeddings.

    Parameters
    ----------
    metric : {'l2', 'cosine', 'same_label'}
        Distance between the probability vectors (see :func:`.distances.probability_distances`).
    C : float
        Inverse regularisation strength of ``LogisticRegression``.
    random_state : int, RandomState or None

    Attributes
    ----------
    classifier_ : LogisticRegression
        Fitted on L2-normalised embeddings.
    classes_ : ndarray of str
    """

    def __init__(self, metric="l2", C=10.0, random_state=None):
        self.metric = metric
        self.C = C
        self.random_state = random_state

    def fit(self, X, y):
        """Fit the classifier on embeddings (n_images, D) float32 and their labels (n_images,); returns self."""
        X, y = check_X_y(X, y, dtype=np.float64)
        self.classifier_ = LogisticRegression(C=self.C, max_iter=2000, random_state=self.random_state)
        self.classifier_.fit(normalize(X), y)
        self.classes_ = self.classifier_.classes_
        return self

    def predict_proba(self, X):
        """Class probabilities, (n_images, n_classes) float64, columns in ``classes_`` order."""
        check_is_fitted(self)
        return self.classifier_.predict_proba(normalize(check_array(X, dtype=np.float64)))

    def reference_proba(self, references):
        """``predict_proba(references)``, remembered for the last array object asked about.

        A service or A1 scores every query against the same reference matrix; this computes its probabilities once.
        The matrix must not be changed in place between calls (a new array is recomputed).
        """
        memo = self.__dict__.get("_reference_memo")
        if memo is not None and memo[0]() is references:
            return memo[1]
        probabilities = self.predict_proba(references)
        try:
            self._reference_memo = (weakref.ref(references), probabilities)
        except TypeError:  # a list or other object that takes no weak reference: nothing remembered
            pass
        return probabilities

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_reference_memo", None)  # a cache, never pickled
        return state

    def score(self, X, y):
        """Classification accuracy, in [0, 1] (sklearn's meaning: higher is better)."""
        check_is_fitted(self)
        return float(accuracy_score(y, self.classes_[self.predict_proba(X).argmax(1)]))

    def distances(self, queries, references):
        """``metric`` distance between the probability vectors, (n_q, n_r) float64."""
        check_is_fitted(self)
        return probability_distances(self.predict_proba(queries), self.reference_proba(references), self.metric)


class HybridRanker(BaseEstimator):
    """Labels first, appearance within: label agreement in bands, then the embeddings' cosine distance.

    ``classprob_same`` alone gives every image of the predicted label almost the same distance, so within a label
    its order follows the classifier's confidence. Here a reference in a better label-agreement band always comes
    first, and within a band the cosine distance alone orders the references, so the images of one label are
    ordered by how they look (see :func:`.distances.label_then_appearance`).

    Parameters
    ----------
    classifier : ClassProbRanker
        Already fitted; only its ``predict_proba`` is used.
    band : float
        Width of a label-agreement band, in (0, 1]; ``training.select_hybrid_band`` chooses it on validation.
    """

    def __init__(self, classifier=None, band=0.2):
        self.classifier = classifier
        self.band = band

    def fit(self, X=None, y=None):
        """Nothing to learn beyond the fitted classifier (checked here); returns self."""
        check_is_fitted(self.classifier)
        self.classes_ = self.classifier.classes_
        return self

    def distances(self, queries, references):
        """The hybrid distance of every query to every reference, (n_q, n_r) float64; lower is more similar."""
        check_is_fitted(self)
        query_p, reference_p = self.classifier.predict_proba(queries), self.classifier.reference_proba(references)
        return label_then_appearance(query_p, reference_p, queries, references, self.band)


class KReciprocalRanker(BaseEstimator):
    """Another ranker's distances, k-reciprocally re-ranked (:func:`.distances.k_reciprocal`).

    Each call ranks the queries and references together: ``ranker.distances`` of all of them against all of them,
    so it costs ``(n_q + n_r) ** 2`` distances, and its answer for one query depends on the other references.

    Parameters
    ----------
    ranker : a fitted ranker
    k1, k2 : int
        Reciprocal neighbours and the query-expansion neighbours (the paper's 20 and 6).
    lambda_value : float
        Weight of the original distance, in [0, 1] (the paper's 0.3).
    """

    def __init__(self, ranker=None, k1=20, k2=6, lambda_value=0.3):
        self.ranker = ranker
        self.k1 = k1
        self.k2 = k2
        self.lambda_value = lambda_value

    needs_whole_gallery = True  # one query's answer depends on every reference: never ranked block by block

    def fit(self, X=None, y=None):
        """Nothing to learn; returns self."""
        return self

    def __sklearn_is_fitted__(self):
        return True

    def distances(self, queries, references):
        """Re-ranked distances, (n_q, n_r) float64; lower is more similar."""
        everything = np.vstack([np.asarray(queries), np.asarray(references)])
        return k_reciprocal(self.ranker.distances(everything, everything), len(queries), self.k1, self.k2,
                            self.lambda_value)


def register_ranker(name, build):
    """Offer a ranker by name to every door (A1 ``--ranker``, the service's ``ranker``, the API, step 5): the one
    registration point.

    Parameters
    ----------
    name : str
        Its name in reports and requests; a name already registered raises ValueError.
    build : callable (svm_payload, classprob_payload, random_state) -> ranker or None
        Makes the ranker of a run from step 4's payloads (each a dict, or None when missing); returns None when the
        run lacks what the ranker needs. The ranker has ``distances(queries, references)`` (see the module).
    """
    if name in _REGISTRY:
        raise ValueError(f"a ranker named {name!r} is already registered")
    _REGISTRY[name] = build


def ranker_names():
    """Every registered ranker name, in report order."""
    return tuple(_REGISTRY)


def build_rankers(svm_payload=None, classprob_payload=None, random_state=None):
    """Every ranker available to a run, in report order (:func:`ranker_names`), ready for ``distances``.

    Parameters
    ----------
    svm_payload : dict, optional
        What 4_trainSvm.py saves at ``P.svmPath``: ``{'ranker': WeightedL2Ranker, 'calibrated': CalibratedRanker,
        ...}``; without it, no weightedl2 rankers.
    classprob_payload : dict, optional
        What 4_trainSvm.py saves at ``P.classifierPath``: ``{'ranker': ClassProbRanker, 'hybrid_band': float or
        None, ...}``; the hybrid ranker only when ``hybrid_band`` is set.
    random_state : int or None
        Seeds the random baseline.

    Returns
    -------
    dict of str to ranker
    """
    built = {name: build(svm_payload, classprob_payload, random_state) for name, build in _REGISTRY.items()}
    return {name: ranker for name, ranker in built.items() if ranker is not None}


def _classprob(metric):
    def build(svm, classprob, random_state):
        return None if classprob is None else copy.deepcopy(classprob["ranker"]).set_params(metric=metric)
    return build


_REGISTRY = {}
register_ranker("random", lambda svm, classprob, random_state: RandomRanker(random_state).fit())
register_ranker("L1", lambda svm, classprob, random_state: L1Ranker())
register_ranker("L2", lambda svm, classprob, random_state: L2Ranker())
register_ranker("cosine", lambda svm, classprob, random_state: CosineRanker())
register_ranker("cosine+colour", lambda svm, classprob, random_state: ColourCosineRanker(DEFAULT_COLOUR_WEIGHT))
register_ranker("weightedl2", lambda svm, classprob, random_state: None if svm is None else svm["ranker"])
register_ranker("weightedl2prob", lambda svm, classprob, random_state: None if svm is None else svm["calibrated"])
for _name, _metric in CLASSPROB_METRICS.items():
    register_ranker(_name, _classprob(_metric))
register_ranker("hybrid", lambda svm, classprob, random_state: None if classprob is None or classprob.get(
    "hybrid_band") is None else HybridRanker(classprob["ranker"], classprob["hybrid_band"]).fit())
