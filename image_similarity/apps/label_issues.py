"""Label issues: which images' labels look wrong, from out-of-sample class probabilities and confident learning.

The class-probability classifier (a logistic regression on the embeddings, the one behind the ``classprob_*``
rankers) is fitted k times by stratified k-fold cross-validation of the train + validation images, so every one of
them gets probabilities from a classifier that never saw it; the test images get theirs from a classifier fitted
on all train + validation images. cleanlab (confident learning, Northcutt et al. 2021) then ranks and flags.

Choices, and why:

- **Folds: A6 averages the probabilities of 3 fold assignments of a 5-fold** (``li_nrRepeats``; ``n_repeats``
  here, 1 by default). One k-fold's ranking depends on which images happen to share a fold, and averaging smooths
  that out. On fashionTexture11 with 5% of the labels flipped (frozen embeddings; ``bench/label_issues.py
  variants``, plantings on the splits of seeds 1 and 2, never the reported seed 0), 3 averaged 5-folds found more
  of the flipped images in the top 2 x flipped than one 5-fold or one 10-fold: mean recall 0.865 against 0.846 and
  0.854 over six plantings (about one image in 64; better or equal on all six). On the reported planting it
  found 2 fewer than the single 5-fold (0.766 against 0.797). It costs 3 times the fits. A cosine
  15-nearest-neighbour classifier did far worse (0.711).
- **C: the best validation log loss** (``svm_classProbCCriterion``, shared with step 4; ``C_criterion`` here).
  Ranking by the probability of the given label needs probabilities that fit, and validation accuracy
  is a coarse judge of that: on six plantings of 5% flipped labels (the same bench, never the reported planting)
  accuracy chose C = 1, 10 or 100 from planting to planting and log loss chose 10 every time. Recall in the top
  2 x flipped was the same on average (0.865), in the top 1 x and 3 x higher (0.682 against 0.659, 0.945 against
  0.930).
- **Ranking: ``self_confidence`` by default**, the probability of the given label (cleanlab's default). cleanlab's
  documentation says ``normalized_margin`` (p(given) - max p(other)) is better at class-conditional mistakes and
  ``self_confidence`` at images that fit no label or several; the tutorial's advice removes ambiguous images as
  well as wrong ones. On planted noise (5% of fashionTexture11's train + validation labels flipped,
  bench/label_issues.py) ``self_confidence`` found at least as many of the flipped images in the top 2 x flipped:
  recall 0.766 against 0.766 on frozen embeddings (0.797 against 0.703 with one 5-fold), 0.844 against 0.828 on
  refined ones. The ``method`` argument switches.
- **Flagging: ``filter_by='prune_by_noise_rate'``** (cleanlab's default): the confident joint estimates how many
  images of each given label really belong to each other label, and that many of the lowest-margin ones are
  flagged. It gives an estimate of how many labels are wrong, which a fixed cut-off does not; ``'both'`` is more
  conservative, ``'confident_learning'`` flags more. The ranking covers every image; the flag says where cleanlab
  would stop.
- **Suggested label: the most probable label other than the given one**, so every row says what it would be
  instead.
"""
import csv
import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.model_selection import RepeatedStratifiedKFold, train_test_split

from ..data.fileio import save_csv
from ..search.rankers import ClassProbRanker
from ..pipeline.training import C_CRITERIA, select_classprob_C

__all__ = ["LABEL_ISSUE_COLUMNS", "RANKING_METHODS", "LabelIssues", "out_of_fold_probabilities",
           "out_of_sample_probabilities", "find_label_issues", "different_label_duplicates", "save_label_issues",
           "load_label_issues", "read_near_duplicate_groups", "read_exclude_file", "without_keys"]

logger = logging.getLogger(__name__)

LABEL_ISSUE_COLUMNS = ("rank", "key", "split", "given_label", "suggested_label", "p_given_label",
                       "p_suggested_label", "label_quality", "flagged", "duplicate_with_other_label")
RANKING_METHODS = ("self_confidence", "normalized_margin")


def out_of_fold_probabilities(classifier, X, labels, n_folds=5, random_state=None, n_jobs=None, n_repeats=1):
    """Class probabilities of every image from clones of ``classifier`` fitted on the other folds.

    With ``n_repeats`` > 1 the k-fold is repeated with other fold assignments (sklearn's
    ``RepeatedStratifiedKFold``) and each image's ``n_repeats`` out-of-fold probabilities are averaged.

    Parameters
    ----------
    classifier : estimator with fit(X, y), predict_proba(X) and classes_
        For example ``rankers.ClassProbRanker(C=...)``; cloned, never fitted itself.
    X : ndarray of shape (n_images, D), float32
        Embeddings.
    labels : sequence of str, length n_images
    n_folds : int
        Stratified folds; lowered to the size of the largest label when that is smaller (at least 2).
    random_state : int or None
        Seeds the fold assignment.
    n_jobs : int or None
        Folds fitted in parallel (joblib; -1 = one per core).
    n_repeats : int
        Fold assignments averaged over, >= 1; costs ``n_repeats * n_folds`` fits.

    Returns
    -------
    proba : ndarray of shape (n_images, n_classes), float64
        Rows sum to 1; columns in ``classes`` order (0 for a label a fold's classifier never saw).
    classes : ndarray of str
        The sorted labels.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    n_splits = max(2, min(n_folds, int(counts.max())))
    if counts.min() < n_splits:
        logger.warning("label(s) %s have fewer than %d images: some folds hold none of them",
                       ", ".join(classes[counts < n_splits]), n_splits)
    with warnings.catch_warnings():  # the small-label warning above says it once, in words
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats,
                                             random_state=random_state).split(X, labels))
    fitted = Parallel(n_jobs=n_jobs)(delayed(clone(classifier).fit)(X[rows], labels[rows]) for rows, _ in folds)
    proba = np.zeros((len(labels), len(classes)))
    for model, (_, held) in zip(fitted, folds):  # every image is held out once per repeat
        proba[np.ix_(held, np.searchsorted(classes, model.classes_))] += model.predict_proba(X[held])
    return proba / n_repeats, classes


def out_of_sample_probabilities(X, labels, splits, C_candidates, n_folds=5, random_state=None, n_jobs=None,
                                n_repeats=1, C_criterion="log_loss"):
    """Class probabilities that no classifier which saw the image made, for every image.

    The class-probability classifier's C is the candidate with the best validation ``C_criterion`` (train fitted,
    'val' scored; see :func:`.training.select_classprob_C`); without 'val' images, on a stratified 20% of the
    non-test images; a single candidate is used as it is (A6 passes step 4's choice when it reuses it). Non-test
    images ('train', 'val' or any other split name) get out-of-fold probabilities; 'test' images those of a
    classifier fitted on every non-test image.

    Parameters
    ----------
    X : ndarray of shape (n_images, D), float32
    labels, splits : sequences of str, length n_images
    C_candidates : sequence of float
        ``svm_classProbCValCandidates``.
    n_folds : int
    random_state : int or None
    n_jobs : int or None
        Folds fitted in parallel (:func:`out_of_fold_probabilities`).
    n_repeats : int
        Fold assignments averaged over (:func:`out_of_fold_probabilities`).
    C_criterion : {'log_loss', 'accuracy'}
        How C is chosen (``svm_classProbCCriterion``, as step 4).

    Returns
    -------
    proba : ndarray of shape (n_images, n_classes), float64
    classes : ndarray of str
        Labels of the non-test images, sorted; a test label outside them is a ValueError.
    C : float
        The chosen C.
    """
    if C_criterion not in C_CRITERIA:
        raise ValueError(f"the C criterion must be one of {', '.join(C_CRITERIA)}, got {C_criterion!r}")
    labels, splits = np.asarray(labels), np.asarray(splits)
    fit_rows, test_rows = np.flatnonzero(splits != "test"), np.flatnonzero(splits == "test")
    if len(np.unique(labels[fit_rows])) < 2:
        raise ValueError(f"label issues need at least 2 labels among the {len(fit_rows)} train/val images")
    if len(C_candidates) == 1:
        C = float(C_candidates[0])
    else:
        if (splits == "val").any():
            train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "val")
        else:
            train, val = train_test_split(fit_rows, test_size=0.2, stratify=_stratifiable(labels[fit_rows]),
                                          random_state=random_state)
        C = select_classprob_C(X[train], labels[train], X[val], labels[val], C_candidates, random_state,
                               C_criterion)[0].C
    classifier = ClassProbRanker(C=C, random_state=random_state)
    proba = np.zeros((len(labels), len(np.unique(labels[fit_rows]))))
    proba[fit_rows], classes = out_of_fold_probabilities(classifier, X[fit_rows], labels[fit_rows], n_folds,
                                                         random_state, n_jobs, n_repeats)
    if len(test_rows):
        unknown = sorted(set(labels[test_rows]) - set(classes))
        if unknown:
            raise ValueError(f"test label(s) {', '.join(unknown)} have no train/val image")
        proba[test_rows] = clone(classifier).fit(X[fit_rows], labels[fit_rows]).predict_proba(X[test_rows])
    return proba, classes, C


def _stratifiable(labels):
    """``labels`` for train_test_split's ``stratify``, or None when a label has a single image."""
    return labels if np.unique(labels, return_counts=True)[1].min() >= 2 else None


@dataclass
class LabelIssues:
    """Every scored image, most suspect first.

    Attributes
    ----------
    rows : list of dict
        One dict per image with the keys of ``LABEL_ISSUE_COLUMNS``; ``rank`` starts at 1.
    classes : list of str
    proba : ndarray of shape (n_images, n_classes), float64
        Out-of-sample class probabilities, rows in ``rows`` order.
    n_flagged : int
        Images cleanlab flags as label issues (``flagged == 'yes'``).
    """

    rows: list
    classes: list
    proba: np.ndarray
    n_flagged: int


def find_label_issues(keys, splits, labels, proba, classes, method="self_confidence", duplicates=None):
    """Rank images by how likely their given label is wrong, with cleanlab.

    Parameters
    ----------
    keys, splits, labels : sequences of str, length n_images
        Image keys, their split ('train', 'val', 'test' or any name) and given label.
    proba : ndarray of shape (n_images, n_classes), float64
        Out-of-sample class probabilities (:func:`out_of_fold_probabilities`); columns in ``classes`` order.
    classes : sequence of str, sorted
    method : {'self_confidence', 'normalized_margin'}
        cleanlab's label-quality score used for the ranking (see the module docstring).
    duplicates : dict of str to list of str, optional
        :func:`different_label_duplicates`: named in the ``duplicate_with_other_label`` column.

    Returns
    -------
    LabelIssues
    """
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    if method not in RANKING_METHODS:
        raise ValueError(f"label-issue ranking method must be one of {', '.join(RANKING_METHODS)}, got {method!r}")
    classes = list(classes)
    given = np.array([classes.index(label) for label in labels])
    quality = get_label_quality_scores(given, proba, method=method)
    flagged = cleanlab_find(given, proba, filter_by="prune_by_noise_rate")
    others = proba.copy()
    others[np.arange(len(given)), given] = -1.0
    suggested = others.argmax(1)
    order = np.argsort(quality, kind="stable")
    duplicates = duplicates or {}
    rows = [{"rank": rank, "key": keys[i], "split": splits[i], "given_label": classes[given[i]],
             "suggested_label": classes[suggested[i]], "p_given_label": float(proba[i, given[i]]),
             "p_suggested_label": float(proba[i, suggested[i]]), "label_quality": float(quality[i]),
             "flagged": "yes" if flagged[i] else "no",
             "duplicate_with_other_label": " ".join(duplicates.get(keys[i], []))}
            for rank, i in enumerate(order, 1)]
    return LabelIssues(rows, classes, proba[order], int(flagged.sum()))


def different_label_duplicates(groups, label_of):
    """Near-duplicates that carry different labels: ``{key: [keys of its near-duplicates with another label]}``.

    Parameters
    ----------
    groups : iterable of iterables of str
        Groups of near-duplicate keys (``dedup.find_near_duplicate_groups``, or the groups of step 1's
        near_duplicates.csv).
    label_of : callable, key -> label
    """
    out = {}
    for group in groups:
        group = sorted(group)
        for key in group:
            others = [other for other in group if label_of(other) != label_of(key)]
            if others:
                out[key] = others
    return out


def save_label_issues(path, issues):
    """Write ``issues.rows`` as CSV with ``LABEL_ISSUE_COLUMNS`` (atomically); probabilities to 4 decimals."""
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else value
    return save_csv(path, LABEL_ISSUE_COLUMNS, [[cell(row[c]) for c in LABEL_ISSUE_COLUMNS] for row in issues.rows])


def load_label_issues(path, n=None):
    """The first ``n`` rows (all when None) of a label_issues.csv as dicts of strings, most suspect first."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows if n is None else rows[:n]


def read_near_duplicate_groups(path):
    """Groups of keys from step 1's near_duplicates.csv (``group,key,kept``); [] when the file is absent."""
    if not Path(path).is_file():
        return []
    groups = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            groups.setdefault(row["group"], []).append(row["key"])
    return list(groups.values())


def read_exclude_file(rows, split_of, source="labelIssuesExcludeFile"):
    """The train and validation keys a label-issue exclude file names; test keys are kept, with a warning.

    Parameters
    ----------
    rows : list of list of str
        The file's rows (``fileio.read_tsv``): the key is the first column, so label_issues.csv filtered and saved
        as TSV works; a header row whose first cell is ``key`` is skipped.
    split_of : dict of str to str
        ``{key: split}`` for every image of the dataset's splits.
    source : str
        Named in messages (the file's path).

    Returns
    -------
    set of str
        Keys to leave out of training.

    Raises
    ------
    ValueError
        Naming the first key that is not an image of the dataset (and how many such keys there are).
    """
    keys = [row[0].strip().replace("\\", "/") for row in rows if row and row[0].strip()]
    keys = [key for key in keys if key != "key"]
    unknown = [key for key in keys if key not in split_of]
    if unknown:
        raise ValueError(f"{source}: {unknown[0]!r} is not an image of this dataset's splits"
                         + (f" ({len(unknown) - 1} more unknown keys)" if len(unknown) > 1 else ""))
    test = sorted(key for key in keys if split_of[key] == "test")
    if test:
        logger.warning("%s: %d test image(s) ignored, e.g. %s: a test image is never excluded (the evaluation "
                       "keeps the protocol's labels)", source, len(test), test[0])
    return {key for key in keys if split_of[key] != "test"}


def without_keys(ranking_sets, excluded):
    """Ranking sets with the ``excluded`` images taken out (step 4 with labelIssuesExcludeFile).

    A set whose query or positive is excluded is dropped; excluded negatives are removed from the others.

    Parameters
    ----------
    ranking_sets : list of splits.RankingSet
    excluded : set of str

    Returns
    -------
    list of splits.RankingSet
        New objects; the inputs are unchanged.
    """
    if not excluded:
        return list(ranking_sets)
    return [dataclasses.replace(s, negatives=[k for k in s.negatives if k not in excluded],
                                references=[k for k in s.references if k not in excluded])
            for s in ranking_sets if s.query not in excluded and s.positive not in excluded]
