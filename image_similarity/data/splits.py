"""Train, validation and test splits, and the ranking sets (query, one positive, many negatives) built from them.

This is the tutorial's algorithm (``1_prepareData.py`` and ``getImagePairs`` in its ``helpers.py``); step 1, the SQL
variant and the attributes all go through :func:`splits_and_ranking_sets`. All randomness comes from one
``numpy.random.default_rng(seed)`` passed in by the caller, never from global seeding, and labels are always visited
in sorted order, so the same seed and the same images give the same splits and sets.
"""
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from .fileio import load_json, save_json

__all__ = ["SPLITS", "label_of", "group_by_label", "parse_groups_file", "split_images", "RankingSet", "make_ranking_sets",
           "splits_and_ranking_sets", "save_split", "load_split", "split_keys", "save_ranking_sets", "load_ranking_sets"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def label_of(key):
    """The label of an image key: its first path component ('can/can_1.jpg' -> 'can')."""
    parts = PurePosixPath(key).parts
    if len(parts) < 2:
        raise ValueError(f"image key {key!r} has no label folder (expected 'label/file.jpg')")
    return parts[0]


def _split_unit(key, split_by, groups):
    """What moves between splits as one piece: the key's group when it has one, else the image, or with 'subdir'
    its sub-folder under the label."""
    if key in groups:
        return ("group", groups[key])
    parts = PurePosixPath(key).parts
    return "/".join(parts[:2]) if split_by == "subdir" and len(parts) > 2 else key


def _units(keys, split_by, groups):
    """Keys grouped into split units, sorted, as a list of lists."""
    units = {}
    for key in sorted(keys):
        units.setdefault(_split_unit(key, split_by, groups), []).append(key)
    return list(units.values())


def parse_groups_file(rows, known_keys=None, excluded_keys=()):
    """``{key: group id}`` from groupsFile rows (relative/path, group id): the same object photographed again.

    Parameters
    ----------
    rows : list of list of str
        ``fileio.read_tsv(P.groupsFilePath)``.
    known_keys : collection of str, optional
        The images that exist; a row naming another one is a ValueError (None: rows are not checked).
    excluded_keys : collection of str
        Images that exist but were dropped (unreadable, removed duplicates): their rows are ignored.

    Returns
    -------
    dict of str to str
        Images not listed have no group. A group whose images have different labels is a ValueError naming it.
    """
    groups, label_of_group = {}, {}
    for number, row in enumerate(rows, 1):
        where = f"groupsFile row {number} {chr(9).join(row)!r}"
        if len(row) != 2 or not row[1].strip():
            raise ValueError(f"{where}: expected 2 tab-separated columns (relative/path, group id)")
        key, group = row[0].strip().replace("\\", "/"), row[1].strip()
        if key in excluded_keys:
            continue
        if known_keys is not None and key not in known_keys:
            raise ValueError(f"{where}: no image {key!r} under the image folder")
        if groups.setdefault(key, group) != group:
            raise ValueError(f"{where}: {key} is listed in groups {groups[key]!r} and {group!r}")
        if label_of_group.setdefault(group, label_of(key)) != label_of(key):
            raise ValueError(f"{where}: group {group!r} holds images of labels {label_of_group[group]!r} and "
                             f"{label_of(key)!r}; a group is one object, so one label")
    return groups


def _shuffled(items, rng):
    return [items[i] for i in rng.permutation(len(items))]


def _parse_split_file(rows, known_keys, excluded_keys):
    """``{key: 'train'|'test'}`` from splitFile rows; every bad row is an error naming it."""
    assignment = {}
    for number, row in enumerate(rows, 1):
        where = f"splitFile row {number} {chr(9).join(row)!r}"
        if len(row) != 2:
            raise ValueError(f"{where}: expected 2 tab-separated columns (relative/path, train|test), got {len(row)}")
        key, split = row[0].strip().replace("\\", "/"), row[1].strip().lower()
        if split not in ("train", "test"):
            raise ValueError(f"{where}: split must be 'train' or 'test', got {row[1]!r}")
        if key in excluded_keys:
            logger.info("%s: %s was left out (unreadable or a removed near-duplicate)", where, key)
            continue
        if key not in known_keys:
            raise ValueError(f"{where}: no image {key!r} under the image folder")
        if assignment.setdefault(key, split) != split:
            raise ValueError(f"{where}: {key} is listed as both train and test")
    return assignment


def split_images(keys_by_label, ratio_train, ratio_val, split_by="filename", split_file_rows=None, seed=0,
                 excluded_keys=(), group_file_rows=None):
    """Split each label's images into train, validation and test.

    Per label (in sorted order), the split units are shuffled and the first ``int(ratio_train * n)`` go to train,
    the rest to test; units are single images with ``split_by='filename'``, or with ``'subdir'`` whole
    sub-folders ``label/subdir/...`` (an image directly in ``label/`` is a unit of its own); with a groups file,
    every group is one unit, whatever ``split_by`` says. Split-file rows replace the random train/test choice. Then ``int(ratio_val * n_train_units)`` randomly chosen train units of
    each label move to validation.

    Parameters
    ----------
    keys_by_label : dict of str to list of str
        Image keys ('label/file.jpg') per label.
    ratio_train : float
        Fraction of each label's units sent to train, in [0, 1].
    ratio_val : float
        Fraction of each label's train units moved to validation, in [0, 1); 0 = no validation images.
    split_by : {'filename', 'subdir'}
    split_file_rows : list of list of str, optional
        ``[relative/path, 'train'|'test']`` rows (``fileio.read_tsv(P.splitFilePath)``). Images not listed are
        left out with a warning; an unknown path, a bad value or a path listed twice with different splits is a
        ValueError naming the row.
    seed : int or numpy.random.Generator
        Seed of ``numpy.random.default_rng``.
    excluded_keys : collection of str
        Images that exist but were dropped (unreadable, removed duplicates): split-file rows naming them are ignored.
    group_file_rows : list of list of str, optional
        ``[relative/path, group id]`` rows (see :func:`parse_groups_file`): each group stays on one side. A
        split file that puts one group on both sides is a ValueError naming the group.

    Returns
    -------
    dict
        ``{'train'|'val'|'test': {label: sorted list of keys}}``; every label appears in every split, possibly
        with an empty list.
    """
    if split_by not in ("filename", "subdir"):
        raise ValueError(f"imagesSplitBy must be 'filename' or 'subdir', got {split_by!r}")
    if not 0.0 <= ratio_train <= 1.0:
        raise ValueError(f"ratioTrainTest must be in [0, 1], got {ratio_train}")
    if not 0.0 <= ratio_val < 1.0:
        raise ValueError(f"ratioValFromTrain must be in [0, 1), got {ratio_val}")
    rng = np.random.default_rng(seed)
    assignment = None
    known = {key for keys in keys_by_label.values() for key in keys}
    groups = {} if group_file_rows is None else parse_groups_file(group_file_rows, known, set(excluded_keys))
    if split_file_rows is not None:
        assignment = _parse_split_file(split_file_rows, known, set(excluded_keys))
        sides = {}
        for key, split in sorted(assignment.items()):
            if key in groups and sides.setdefault(groups[key], (key, split))[1] != split:
                other, other_split = sides[groups[key]]
                raise ValueError(f"splitFile puts group {groups[key]!r} on both sides: {other} in {other_split}, "
                                 f"{key} in {split}; a group must stay in train or in test")
        unlisted = sorted(known - set(assignment))
        if unlisted:
            logger.warning("%d image(s) not in the splitFile are left out: %s%s", len(unlisted),
                           ", ".join(unlisted[:10]), " ..." if len(unlisted) > 10 else "")
    splits = {split: {} for split in SPLITS}
    for label in sorted(keys_by_label):
        units = _units(keys_by_label[label], split_by, groups)
        if assignment is None:
            units = _shuffled(units, rng)
            n_train = int(ratio_train * len(units))
            train, test = units[:n_train], units[n_train:]
        else:
            units = [[k for k in unit if k in assignment] for unit in units]
            train = [[k for k in unit if assignment[k] == "train"] for unit in units]
            test = [[k for k in unit if assignment[k] == "test"] for unit in units]
            train, test = [u for u in train if u], [u for u in test if u]
        train = _shuffled(train, rng)
        n_val = int(ratio_val * len(train))
        for split, chosen in (("val", train[:n_val]), ("train", train[n_val:]), ("test", test)):
            splits[split][label] = sorted(key for unit in chosen for key in unit)
    return splits


@dataclass
class RankingSet:
    """One query image and the references it is ranked against: one positive (same label) and many negatives.

    Attributes
    ----------
    query : str
        Key of the query image.
    positive : str
        Key of an image with the query's label (never the query itself).
    negatives : list of str
        Keys of images with other labels, drawn with replacement.
    references : list of str
        The positive and the negatives, shuffled: ``1 + len(negatives)`` keys.
    """

    query: str
    positive: str
    negatives: list = field(default_factory=list)
    references: list = field(default_factory=list)

    @property
    def is_positive(self):
        """ndarray of shape (len(references),), bool: True where the reference is the positive."""
        return np.array([ref == self.positive for ref in self.references], dtype=bool)


def make_ranking_sets(keys_by_label, max_queries_per_label, max_negatives_per_query, rng):
    """Ranking sets for one split, as in the tutorial's ``getImagePairs``.

    Only labels with more than one image give queries. Per label (sorted), its images are shuffled and the first
    ``max_queries_per_label`` become queries. Each query gets one positive drawn uniformly from its label's other
    images, and ``max_negatives_per_query`` negatives drawn with replacement: a label other than the query's,
    uniformly among the split's labels with at least one image, then an image of it, uniformly. The references
    (positive + negatives) are then shuffled.

    Parameters
    ----------
    keys_by_label : dict of str to list of str
        One split, as returned by :func:`split_images`.
    max_queries_per_label : int
    max_negatives_per_query : int
    rng : numpy.random.Generator or int
        The random source (an int seeds ``numpy.random.default_rng``).

    Returns
    -------
    list of RankingSet
        ``sum(min(n_label, max_queries_per_label))`` sets over labels with two or more images.
    """
    rng = np.random.default_rng(rng)
    labels = sorted(label for label, keys in keys_by_label.items() if keys)
    sets = []
    for label in sorted(label for label in labels if len(keys_by_label[label]) > 1):
        other_labels = [other for other in labels if other != label]
        if max_negatives_per_query > 0 and not other_labels:
            raise ValueError(f"label {label!r} is the only label with images in this split: no negatives to draw")
        keys = _shuffled(sorted(keys_by_label[label]), rng)
        for query in keys[:max_queries_per_label]:
            candidates = [key for key in keys if key != query]
            positive = candidates[rng.integers(len(candidates))]
            negatives = []
            for _ in range(max_negatives_per_query):
                other = keys_by_label[other_labels[rng.integers(len(other_labels))]]
                negatives.append(other[rng.integers(len(other))])
            sets.append(RankingSet(query, positive, negatives, _shuffled([positive, *negatives], rng)))
    return sets


def group_by_label(keys, labels=None):
    """``{label: [keys]}`` in the order of ``keys``: each key's label is ``labels[i]`` or, by default, its folder."""
    grouped = {}
    for i, key in enumerate(keys):
        grouped.setdefault(label_of(key) if labels is None else str(labels[i]), []).append(key)
    return grouped


def _warn_of_labels_without_queries(splits, sets):
    """Log a warning naming the labels that give a split no ranking set (fewer than 2 of their images in it).

    A later step that ranks that split (choosing settings on validation, evaluating on test) would otherwise find
    too few, or no, ranking sets without saying why.
    """
    labels = sorted({label for split in SPLITS for label, keys in splits[split].items() if keys})
    for split in SPLITS:
        short = [label for label in labels if len(splits[split].get(label, ())) < 2]
        if not short or not any(splits[split].values()):
            continue  # every label gives queries, or the split was left empty on purpose (a ratio of 0)
        what = "no ranking sets at all" if not sets[split] else "ranking sets without them"
        logger.warning("%s holds fewer than 2 images of label(s) %s: they give no %s query (%s); more images or a "
                       "larger %s share would", split, ", ".join(short), split, what, split)


def splits_and_ranking_sets(keys_by_label, ratio_train, ratio_val, max_queries, max_negatives, split_by="filename",
                            split_file_rows=None, seed=0, excluded_keys=(), group_file_rows=None):
    """The splits (:func:`split_images`) and the ranking sets of each (:func:`make_ranking_sets`), from one seed.

    The tutorial's recipe as step 1, the SQL variant and the attributes all follow it: one generator seeded with
    ``seed`` draws the ranking sets of train, val and test in that order, so the same images give the same sets.

    Parameters
    ----------
    keys_by_label, ratio_train, ratio_val, split_by, split_file_rows, seed, excluded_keys, group_file_rows
        As :func:`split_images`.
    max_queries, max_negatives : dict of str to int
        Per split ('train', 'val', 'test'): query images per label, and negatives per query.

    Returns
    -------
    splits : dict
        ``{split: {label: sorted keys}}``.
    sets : dict
        ``{split: list of RankingSet}``.

    Raises
    ------
    RuntimeError
        If two splits share an image (a query, a reference or a split member): the tutorial's check.
    """
    splits = split_images(keys_by_label, ratio_train, ratio_val, split_by, split_file_rows, seed=seed,
                          excluded_keys=excluded_keys, group_file_rows=group_file_rows)
    rng = np.random.default_rng(seed)
    sets = {split: make_ranking_sets(splits[split], max_queries[split], max_negatives[split], rng) for split in SPLITS}
    _warn_of_labels_without_queries(splits, sets)
    used = {split: {k for keys in splits[split].values() for k in keys}
            | {k for s in sets[split] for k in (s.query, *s.references)} for split in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        if used[a] & used[b]:
            raise RuntimeError(f"{a} and {b} share {len(used[a] & used[b])} image(s), e.g. {min(used[a] & used[b])}")
    return splits, sets


# Step 1 writes the splits and ranking sets as JSON: plain data, read back without running anything.
_WRITER = "1_prepareData.py"


def _is_str_list(value):
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def save_split(path, keys_by_label):
    """Write one split, ``{label: [keys]}``, as a JSON object (atomically)."""
    return save_json(path, {label: list(keys) for label, keys in keys_by_label.items()})


def load_split(path):
    """Read a :func:`save_split` file: ``{label: [keys]}``; anything else is a ValueError naming ``path``."""
    split = load_json(path, _WRITER)
    if not isinstance(split, dict) or not all(_is_str_list(keys) for keys in split.values()):
        raise ValueError(f"{path}: not a split written by {_WRITER} ({{label: [keys]}}): run it again")
    return split


def split_keys(path):
    """The keys of the split saved at ``path``, sorted."""
    return sorted(key for keys in load_split(path).values() for key in keys)


def save_ranking_sets(path, sets):
    """Write ranking sets as a JSON list of ``{query, positive, negatives, references}`` (atomically)."""
    return save_json(path, [{"query": s.query, "positive": s.positive, "negatives": list(s.negatives),
                             "references": list(s.references)} for s in sets])


def load_ranking_sets(path):
    """Read a :func:`save_ranking_sets` file as a list of :class:`RankingSet`; ValueError naming ``path`` when it
    is anything else."""
    rows = load_json(path, _WRITER)
    fields = {"query", "positive", "negatives", "references"}
    if not isinstance(rows, list) or not all(
            isinstance(row, dict) and set(row) == fields and isinstance(row["query"], str)
            and isinstance(row["positive"], str) and _is_str_list(row["negatives"]) and _is_str_list(row["references"])
            for row in rows):
        raise ValueError(f"{path}: not ranking sets written by {_WRITER} ([{{query, positive, negatives, "
                         "references}]): run it again")
    return [RankingSet(**row) for row in rows]
