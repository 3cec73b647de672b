"""The work of steps 1, 4 and the SQL variant that the scripts would otherwise repeat, on plain values.

Step 1's intermediates are written and read here (:func:`save_prepared`, :func:`load_prepared`); step 4 and the SQL
variant (``store.train_classifier``) train the class-probability ranker with one function,
:func:`train_classprob`, and step 4's weighted L2 with :func:`train_weighted_l2`; step 4 saves both payloads with
:func:`save_rankers` (``rankers.save_payload``: skops, read back without running code).
"""
import logging
from dataclasses import dataclass

from ..apps.label_issues import without_keys
from ..data import fileio
from ..data.splits import SPLITS, label_of, load_ranking_sets, save_ranking_sets, save_split, split_keys
from ..search import rankers
from . import training

__all__ = ["save_prepared", "load_prepared", "train_classprob", "WeightedL2Training", "train_weighted_l2",
           "save_rankers"]

logger = logging.getLogger(__name__)


def save_prepared(layout, labels, splits, sets):
    """Write step 1's intermediates: label tables, splits, ranking sets and their pair CSVs (JSON and CSV).

    Parameters
    ----------
    layout : layout.RunLayout
    labels : list of str
        Sorted; a label's id is its position.
    splits : dict
        ``{split: {label: [keys]}}``.
    sets : dict
        ``{split: list of RankingSet}``.
    """
    fileio.save_json(layout.label_to_id, {label: i for i, label in enumerate(labels)})
    fileio.save_json(layout.id_to_label, {str(i): label for i, label in enumerate(labels)})
    for split in SPLITS:
        save_split(layout.split_keys[split], splits[split])
        save_ranking_sets(layout.ranking_sets[split], sets[split])
        fileio.save_csv(layout.pairs_csv[split], ["query", "reference", "is_positive"], [
            (s.query, ref, int(pos)) for s in sets[split] for ref, pos in zip(s.references, s.is_positive)])


def load_prepared(layout, splits=SPLITS, excluded=frozenset()):
    """Step 1's ranking sets and keys of ``splits``, without the ``excluded`` keys in train and val.

    Returns
    -------
    sets : dict
        ``{split: list of RankingSet}`` (``label_issues.without_keys`` for train and val).
    keys : dict
        ``{split: sorted keys}``.
    """
    sets = {split: load_ranking_sets(layout.ranking_sets[split]) for split in splits}
    keys = {split: split_keys(layout.split_keys[split]) for split in splits}
    for split in set(splits) & {"train", "val"}:
        sets[split] = without_keys(sets[split], excluded)
        keys[split] = [k for k in keys[split] if k not in excluded]
    return sets, keys


def train_classprob(xy, features, val_sets, C_candidates, random_state=None, C_criterion="log_loss",
                    hybrid_bands=(), max_top1_drop=0.01, max_mean_rank_rise=0.1):
    """The class-probability classifier (C chosen on validation) and the hybrid ranker's band, as a payload.

    Parameters
    ----------
    xy : dict
        ``{split: (embeddings (n, D) float32, labels)}``; 'train' and 'val' are needed, every split gets its
        accuracy.
    features : features.Features
        Holds every key of ``val_sets``.
    val_sets : list of RankingSet
        The validation ranking sets the band is chosen on; [] or no ``hybrid_bands``: no hybrid ranker.
    C_candidates, random_state, C_criterion
        As ``training.select_classprob_C``.
    hybrid_bands, max_top1_drop, max_mean_rank_rise
        As ``training.select_hybrid_band``.

    Returns
    -------
    dict
        ``{'ranker': ClassProbRanker, 'C_table', 'C_criterion', 'accuracy': {split: fraction}, 'hybrid_band':
        float or None, 'hybrid_table'}``: the contents of step 4's ``classprob.skops`` and of the SQL ``model`` row.
    """
    classifier, table = training.select_classprob_C(*xy["train"], *xy["val"], C_candidates, random_state,
                                                    C_criterion)
    hybrid, hybrid_table = None, {}
    if hybrid_bands and val_sets:
        hybrid, hybrid_table = training.select_hybrid_band(classifier, features, val_sets, hybrid_bands,
                                                           max_top1_drop, max_mean_rank_rise)
    return {"ranker": classifier, "C_table": table, "C_criterion": C_criterion,
            "accuracy": {split: classifier.score(*data) for split, data in xy.items()},
            "hybrid_band": None if hybrid is None else hybrid.band, "hybrid_table": hybrid_table}


@dataclass
class WeightedL2Training:
    """What :func:`train_weighted_l2` made: the fit and the pairs it was made and measured on.

    Attributes
    ----------
    fit : training.WeightedL2Fit
    pairs : dict
        ``{split: (pair differences (n_pairs, D), same label (n_pairs,) bool)}``.
    pair_accuracy : dict
        ``{split: training.pair_accuracies(...)}``.
    """

    fit: training.WeightedL2Fit
    pairs: dict
    pair_accuracy: dict


def train_weighted_l2(features, sets, keys, C_candidates, l2_normalize=True, neg_pos_ratio=5.0, n_mining_rounds=0,
                      n_mining_add=5000, max_mining_pairs=100000, random_state=None):
    """Step 4's weighted L2 distance: pairs of every split's ranking sets, ``training.fit_weighted_l2`` on train
    (C and the Platt scaling on val, hard negatives mined among the train images), pair accuracies per split.

    Parameters
    ----------
    features : features.Features
    sets, keys : dict
        :func:`load_prepared`'s ranking sets and keys of every split.

    Returns
    -------
    WeightedL2Training
    """
    pairs = {split: training.ranking_set_pairs(features, sets[split], l2_normalize) for split in SPLITS}
    fit = training.fit_weighted_l2(
        pairs["train"], pairs["val"], features, sets["val"], C_candidates, l2_normalize, neg_pos_ratio,
        (features.rows(keys["train"]), [label_of(k) for k in keys["train"]]), n_mining_rounds, n_mining_add,
        max_mining_pairs, random_state)
    accuracy = {split: training.pair_accuracies(fit.ranker, *pairs[split]) for split in SPLITS}
    return WeightedL2Training(fit, pairs, accuracy)


def save_rankers(layout, model_id, weighted_l2, classprob):
    """Write step 4's payloads: ``layout.svm`` (the weighted L2 and its calibration) and ``layout.classifier``
    (:func:`train_classprob`'s payload), both for the features of ``model_id``."""
    fit = weighted_l2.fit
    rankers.save_payload(layout.svm, model_id, ranker=fit.ranker, calibrated=fit.calibrated, C_table=fit.C_table,
                         n_hard_negatives=fit.n_hard_negatives)
    rankers.save_payload(layout.classifier, model_id, **classprob)
