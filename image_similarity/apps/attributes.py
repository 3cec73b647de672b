"""Multi-attribute similarity: one calibrated "same attribute" probability per attribute, combined by weighted mean.

As the tutorial recommends for images that should match on several attributes (say colour and pattern), each
attribute has its own labels and its own ranker over the same embeddings, Platt-calibrated so that every attribute
speaks the same unit: the probability that two images match on it. The combined similarity is the weighted mean of
those probabilities. Averaging raw SVM scores instead would let the attribute with the largest score scale (which
depends on its C and its data) drown the others.

Example::

    colour = AttributeModel.fit(model, colour_labels, name="colour")
    pattern = AttributeModel.fit(model, pattern_labels, name="pattern")
    both = combine([colour, pattern], weights=[1, 2], model=model)
    both.query("query.jpg", k=5)
"""
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..search import rankers
from ..search import ranker_files
from ..pipeline import training
from ..search.core import search
from ..search.distances import from_probability
from ..data.features import Features, sidecar_path
from ..data.fileio import load_json
from ..data.splits import SPLITS, group_by_label, splits_and_ranking_sets

__all__ = ["AttributeModel", "CombinedSimilarity", "combine", "configured_attributes"]

logger = logging.getLogger(__name__)


def _training_data(features, labels):
    """``(keys, matrix, model_id, labels)`` from a SimilarityModel or a feature matrix, labels aligned with rows."""
    gallery = getattr(features, "gallery", None)  # a SimilarityModel's references
    if gallery is not None:
        keys, matrix, model_id = gallery.keys, gallery.matrix, gallery.model_id
        labels = gallery.labels if labels is None else labels
        if labels is None:
            raise ValueError("the similarity model has no labels: pass labels=")
    else:
        matrix, model_id = np.asarray(features, dtype=np.float32), None
        if matrix.ndim != 2:
            raise ValueError(f"features must have shape (n_images, n_dims), got {matrix.shape}")
        keys = [str(i) for i in range(len(matrix))]
    if isinstance(labels, Mapping):
        labels = [labels[k] for k in keys]
    labels = list(labels)
    if len(labels) != len(keys):
        raise ValueError(f"{len(labels)} labels for {len(keys)} images")
    return keys, matrix, model_id, labels


class AttributeModel:
    """The probability that two images match on one attribute, from their embeddings.

    Build one with :meth:`fit` (from embeddings and this attribute's labels) or :meth:`from_pipeline` (from the
    payload 4_trainSvm.py wrote).

    Parameters
    ----------
    ranker : rankers.CalibratedRanker or rankers.ClassProbRanker, fitted
        A Platt-calibrated weighted-L2 ranker (``weightedl2prob``): P(match) is its ``probabilities``; or a
        class-probability ranker: P(match) = sum over classes of P(query in c) P(reference in c).
    name : str
        Names the attribute in combined results.
    model_id : str, optional
        ``backbones.model_id`` of the network whose embeddings the ranker was trained on (None: unknown).
    """

    def __init__(self, ranker, name="attribute", model_id=None):
        self.ranker = ranker
        self.name = name
        self.model_id = model_id

    def probabilities(self, queries, references):
        """P(match on this attribute) of every (query, reference) pair.

        Parameters
        ----------
        queries : ndarray of shape (n_q, D), float32
        references : ndarray of shape (n_r, D), float32

        Returns
        -------
        ndarray of shape (n_q, n_r), float64 in [0, 1]
        """
        if isinstance(self.ranker, rankers.ClassProbRanker):
            return self.ranker.predict_proba(queries) @ self.ranker.predict_proba(references).T
        return self.ranker.probabilities(queries, references)

    def __repr__(self):
        return f"AttributeModel({self.name!r}, {type(self.ranker).__name__}, model_id={self.model_id!r})"

    @classmethod
    def fit(cls, features, labels=None, name="attribute", kind="weightedl2prob", C=1.0, calibration_fraction=0.3,
            max_queries_per_label=100, max_negatives_per_query=100, neg_pos_ratio=5.0, l2_normalize=True,
            random_state=0):
        """Learn one attribute from embeddings and their labels for it.

        With ``kind='weightedl2prob'`` (the tutorial's), each label's images are split into a training part and a
        held-out calibration part, whose ranking sets give (query, reference) pairs
        (``splits.splits_and_ranking_sets``); a :class:`rankers.WeightedL2Ranker` is fitted on the training pairs
        and Platt-calibrated on the held-out ones (``training.fit_weighted_l2``).
        With ``kind='classprob'``, a :class:`rankers.ClassProbRanker` is fitted on all images.

        Parameters
        ----------
        features : SimilarityModel or ndarray of shape (n_images, D), float32
            The embeddings (a model's references, keyed by its keys; a matrix's rows are keyed ``"0"``, ``"1"`` ...).
        labels : sequence or mapping, optional
            This attribute's label of each image (aligned with the rows, or ``{key: label}``). Default: the
            model's own labels.
        name : str
        kind : {'weightedl2prob', 'classprob'}
        C : float or list of float
            SVM (or logistic regression) penalty. A list: the weighted-L2 C with the lowest mean rank of the positive
            on the held-out ranking sets is kept (``training.select_C``).
        calibration_fraction : float
            Fraction of each label's images held out for the calibration, in (0, 1).
        max_queries_per_label, max_negatives_per_query : int
            Ranking sets per label and negatives per query (as in ``PARAMETERS.py``).
        neg_pos_ratio : float
            The Platt fit weighs negatives to total this many times the positives.
        l2_normalize : bool
            Take pair differences of L2-normalised embeddings.
        random_state : int
            Seeds the split, the ranking sets and the SVM.

        Returns
        -------
        AttributeModel
        """
        keys, matrix, model_id, labels = _training_data(features, labels)
        if kind == "classprob":
            ranker = rankers.ClassProbRanker(C=C, random_state=random_state).fit(matrix, np.asarray(labels, str))
            return cls(ranker, name, model_id)
        if kind != "weightedl2prob":
            raise ValueError(f"kind must be 'weightedl2prob' or 'classprob', got {kind!r}")
        by_label = group_by_label(keys, labels)
        _, sets = splits_and_ranking_sets(by_label, 1.0, calibration_fraction,
                                          dict.fromkeys(SPLITS, max_queries_per_label),
                                          dict.fromkeys(SPLITS, max_negatives_per_query), seed=random_state)
        if not sets["train"] or not sets["val"]:
            raise ValueError(f"attribute {name!r}: the training and calibration parts each need two or more images "
                             f"of some label and images of another label (labels: "
                             f"{ {label: len(ks) for label, ks in by_label.items()} }); add images or change "
                             f"calibration_fraction={calibration_fraction}")
        store = Features(keys, matrix, {})
        train, val = (training.ranking_set_pairs(store, sets[part], l2_normalize) for part in ("train", "val"))
        fitted = training.fit_weighted_l2(train, val, store, sets["val"], C if np.ndim(C) else [C], l2_normalize,
                                          neg_pos_ratio, random_state=random_state)
        logger.info("attribute %s: C %g chosen (held-out mean ranks %s), SVM on %d pairs, calibrated on %d held-out "
                    "pairs", name, fitted.ranker.C, fitted.C_table, len(train[1]), len(val[1]))
        calibrated = fitted.calibrated
        return cls(calibrated, name, model_id)

    @classmethod
    def from_pipeline(cls, payload_path, features_path=None, name=None):
        """The attribute learnt by a pipeline run: ``proc/<dataset>/svm.skops`` or ``classprob.skops``.

        Parameters
        ----------
        payload_path : str or Path
            A ``ranker_files.save_payload`` file: ``svm.skops`` gives its Platt-calibrated ranker
            (``weightedl2prob``), ``classprob.skops`` its class-probability ranker.
        features_path : str or Path, optional
            The features the ranker was trained on; default ``features.npy`` beside the payload. Only its sidecar
            is read, for the ``model_id`` the payload must match (``ranker_files.load_payload`` refuses another).
        name : str, optional
            Default: the payload's folder name (the dataset name).

        Returns
        -------
        AttributeModel
        """
        payload_path = Path(payload_path)
        side = sidecar_path(features_path or payload_path.with_name("features.npy"))
        if not side.is_file():
            raise FileNotFoundError(f"{side} not found: the features {payload_path.name} was trained on are needed "
                                    "for their model_id")
        model_id = load_json(side)["model_id"]
        payload = ranker_files.load_payload(payload_path, model_id)
        return cls(payload.get("calibrated", payload["ranker"]), name or payload_path.parent.name, model_id)


def configured_attributes(dataset_name, svm_path, features_path, extra=None):
    """The attributes a pipeline run offers: its own ``svm.skops`` (named after the dataset) plus ``extra``.

    Parameters
    ----------
    dataset_name : str
    svm_path, features_path : Path
        The run's ``svm.skops`` (skipped when absent) and ``features.npy``.
    extra : dict of str to path, optional
        ``{name: svm.skops or classprob.skops}`` of other runs on the same network (``attributeModels``).

    Returns
    -------
    dict of str to AttributeModel
    """
    found = {}
    if Path(svm_path).is_file():
        found[dataset_name] = AttributeModel.from_pipeline(svm_path, features_path, name=dataset_name)
    for name, path in (extra or {}).items():
        found[name] = AttributeModel.from_pipeline(path, name=name)
    return found


class CombinedSimilarity:
    """Several attributes combined: the weighted mean of their match probabilities.

    Follows the ranker contract of :mod:`.rankers` (``distances(queries, references)``, lower is more similar),
    so ``evaluation.rank_ranking_sets`` can score it like any ranker.

    Parameters
    ----------
    attributes : list of AttributeModel
        With distinct names, trained on embeddings of the same network.
    weights : sequence of float, optional
        One non-negative weight per attribute (normalised to sum to 1); default equal weights.
    model : SimilarityModel, optional
        The references and the network for :meth:`query`; its ``model_id`` must match the attributes'.
    """

    def __init__(self, attributes, weights=None, model=None):
        self.attributes = list(attributes)
        names = [a.name for a in self.attributes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need one or more attributes with distinct names, got {names}")
        weights = np.ones(len(names)) if weights is None else np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(names),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(names)} non-negative numbers, not all 0, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.model = model
        ids = {a.name: a.model_id for a in self.attributes if a.model_id is not None}
        if model is not None:
            ids["model"] = model.gallery.model_id
        if len(set(ids.values())) > 1:
            raise ValueError(f"the attributes and the model come from different networks: {ids}")

    def attribute_probabilities(self, queries, references=None):
        """Each attribute's P(match), stacked: ndarray of shape (n_attributes, n_q, n_r), float64.

        ``queries`` (n_q, D) and ``references`` (n_r, D) are embeddings; ``references`` defaults to the model's.
        """
        references = self._references(references)
        return np.stack([a.probabilities(queries, references) for a in self.attributes])

    def probabilities(self, queries, references=None):
        """Combined P(match): the weighted mean of the attributes' probabilities.

        Parameters
        ----------
        queries : ndarray of shape (n_q, D), float32
            Embeddings (use ``model.embed(images)`` for images).
        references : ndarray of shape (n_r, D), float32, optional
            Default: the model's reference embeddings.

        Returns
        -------
        ndarray of shape (n_q, n_r), float64 in [0, 1]
        """
        return np.tensordot(self.weights, self.attribute_probabilities(queries, references), axes=1)

    def distances(self, queries, references):
        """1 - combined P(match), (n_q, n_r) float64 in [0, 1]: lower is more similar."""
        return from_probability(self.probabilities(queries, references))

    def query(self, images, k=5):
        """The ``k`` references with the highest combined P(match) for each query image.

        Parameters
        ----------
        images : str, Path, PIL.Image.Image, ndarray, or a list of them
            As in :meth:`SimilarityModel.query` (files, reference keys, PIL images, uint8 arrays).
        k : int

        Returns
        -------
        pandas.DataFrame
            Columns ``query``, ``reference``, ``probability`` (combined, descending per query), ``rank``
            (1-based), then ``probability_<name>`` per attribute.
        """
        if self.model is None:
            raise ValueError("query needs the references: combine(..., model=<SimilarityModel>)")
        names, queries = self.model.embed(images)
        found = search(self.model.gallery, self, queries, k)
        references = self.model.gallery.matrix
        columns = {"query": [], "reference": [], "probability": [], "rank": [],
                   **{f"probability_{a.name}": [] for a in self.attributes}}
        for i, name in enumerate(names):
            matches = found.matches(i)
            rows = found.indices[i][found.indices[i] >= 0]
            columns["query"] += [name] * len(matches)
            columns["reference"] += [key for key, _ in matches]
            columns["probability"] += [1.0 - distance for _, distance in matches]
            columns["rank"] += list(range(1, len(matches) + 1))
            for a in self.attributes:
                columns[f"probability_{a.name}"] += list(a.probabilities(queries[[i]], references[rows])[0])
        return pd.DataFrame(columns)

    def _references(self, references):
        if references is not None:
            return references
        if self.model is None:
            raise ValueError("no references: pass them, or combine(..., model=<SimilarityModel>)")
        return self.model.gallery.matrix

    def __repr__(self):
        parts = ", ".join(f"{a.name}: {w:.2f}" for a, w in zip(self.attributes, self.weights))
        return f"CombinedSimilarity({parts})"


def combine(attributes, weights=None, model=None):
    """Combine attribute models into one similarity: the weighted mean of their match probabilities.

    Parameters
    ----------
    attributes : list of AttributeModel
    weights : sequence of float, optional
        Non-negative, one per attribute; default equal.
    model : SimilarityModel, optional
        References and network for :meth:`CombinedSimilarity.query`.

    Returns
    -------
    CombinedSimilarity
    """
    return CombinedSimilarity(attributes, weights, model)
