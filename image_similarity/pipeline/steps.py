"""The work of steps 1, 4 and the SQL variant that the scripts would otherwise repeat, on plain values.

Step 1's intermediates are written and read here (:func:`save_prepared`, :func:`load_prepared`); step 4 and the SQL
variant (``store.train_classifier``) train the class-probability ranker with one function,
:func:`train_classprob`, and step 4's weighted L2 with :func:`train_weighted_l2`; step 4 saves both payloads with
:func:`save_rankers` (``ranker_files.save_payload``: skops, read back without running code).
"""
import logging
from dataclasses import dataclass

from ..apps import label_issues
from ..apps.label_issues import read_near_duplicate_groups, without_keys
from ..data import fileio
from ..data.features import load_features
from ..data.splits import (SPLITS, label_of, load_ranking_sets, load_split, save_ranking_sets, save_split,
                           split_keys)
from ..search import ranker_files
from . import training

__all__ = ["usable_keys_by_label", "save_prepared", "load_prepared", "train_classprob", "WeightedL2Training", "train_weighted_l2",
           "save_rankers", "LabelIssueInputs", "label_issue_inputs", "folder_label_issue_inputs", "score_label_issues",
           "save_label_issue_sheet", "labelled_images", "sql_evaluation_table", "refine_items", "earlier_skipped",
           "save_refined", "best_on_validation", "evaluation_table", "save_evaluation"]

logger = logging.getLogger(__name__)


def usable_keys_by_label(keys, removed, img_dir, include_labels, skipped):
    """Step 1's images by label: ``keys`` (relative to ``img_dir``) less the ``removed`` near-duplicates.

    A key outside a label folder is recorded in ``skipped``; a label folder left without images (when
    ``include_labels`` is None or names it) and a label with a single image (no query) are logged as warnings.

    Returns
    -------
    dict of str to list of str
    """
    keys_by_label = {}
    for key in keys:
        if "/" not in key:
            skipped.add(img_dir / key, "not inside a label folder")
        elif key not in removed:
            keys_by_label.setdefault(label_of(key), []).append(key)
    folders = {d.name for d in img_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
    for label in sorted(folders - set(keys_by_label)):
        if include_labels is None or label in include_labels:
            logger.warning("label folder %s has no usable image: left out", img_dir / label)
    for label in sorted(label for label, keys in keys_by_label.items() if len(keys) < 2):
        logger.warning("label %r has only %d image: it gives no query images", label, len(keys_by_label[label]))
    return keys_by_label


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
    ranker_files.save_payload(layout.svm, model_id, ranker=fit.ranker, calibrated=fit.calibrated, C_table=fit.C_table,
                         n_hard_negatives=fit.n_hard_negatives)
    ranker_files.save_payload(layout.classifier, model_id, **classprob)


@dataclass
class LabelIssueInputs:
    """What A6 scores on a finished run (:func:`label_issue_inputs`).

    Attributes
    ----------
    keys : list of str
        Every image of the splits, train then val then test, each sorted.
    splits : list of str
        The split of each key.
    embeddings : ndarray of shape (n_images, D), float32
    near_duplicates : list of list of str
        Step 1's near-duplicate groups.
    C_candidates : list of float
        Step 4's C when it chose it by the same criterion (4 fewer fits), else the candidates given.
    model_id : str
        The network that made the embeddings.
    """

    keys: list
    splits: list
    embeddings: object
    near_duplicates: list
    C_candidates: list
    model_id: str


def label_issue_inputs(layout, C_candidates, C_criterion):
    """A6's inputs from a finished run: step 1's splits, step 3's features, step 1's near-duplicates, step 4's C.

    A ``layout.classifier`` that cannot be used (other features, refused, not step 4's) is logged and A6 chooses C
    among ``C_candidates`` itself.

    Raises
    ------
    ValueError
        When the features lack an image of the splits (naming ``layout.features`` and step 3).
    """
    keys_by_split = {split: split_keys(layout.split_keys[split]) for split in SPLITS}
    keys = [k for split in SPLITS for k in keys_by_split[split]]
    stored = load_features(layout.features)
    missing = sorted(set(keys) - set(stored.keys))
    if missing:
        raise ValueError(f"{layout.features} lacks {len(missing)} image(s) of the splits, e.g. {missing[0]}: "
                         "run 3_featurizeImages.py again")
    model_id = stored.meta["model_id"]
    if layout.classifier.is_file():  # step 4 chose C on the same splits: reused by the same rule
        try:
            step4 = ranker_files.load_payload(layout.classifier, model_id)
        except ValueError as err:  # older features or not step 4's file: A6 does not need it
            logger.warning("%s; choosing C here instead", err)
        else:
            if step4.get("C_criterion", "accuracy") == C_criterion:
                C_candidates = [step4["ranker"].C]
    return LabelIssueInputs(keys, [split for split in SPLITS for _ in keys_by_split[split]], stored.rows(keys),
                            read_near_duplicate_groups(layout.near_duplicates), list(C_candidates), model_id)


def folder_label_issue_inputs(folder, backbone, batch_size, n_workers, hash_size, max_hamming_distance, skipped):
    """A6's inputs from any labelled folder (``folder/<label>/...``): embedded with the pretrained ``backbone``,
    one ``'unsplit'`` split, near-duplicates by dhash of ``hash_size`` within ``max_hamming_distance`` bits."""
    from ..apps import dedup
    from ..data.images import list_images
    from ..models.embedder import load_embedder

    paths = [p for p in list_images(folder, skipped=skipped) if len(p.relative_to(folder).parts) > 1]
    logger.info("embedding %d images under %s with the pretrained %s", len(paths), folder, backbone)
    network = load_embedder(backbone)
    keys, embeddings = network.embed_files(paths, folder, batch_size, n_workers, skipped)
    groups = dedup.find_near_duplicate_groups(dedup.hash_images([folder / k for k in keys], folder, hash_size),
                                              max_hamming_distance)
    return LabelIssueInputs(keys, ["unsplit"] * len(keys), embeddings, groups, None, network.model_id)


def score_label_issues(inputs, C_candidates, n_folds, random_state, n_repeats, C_criterion, ranked_by):
    """Out-of-sample class probabilities of :class:`LabelIssueInputs` and cleanlab's ranking of them.

    Returns
    -------
    issues : label_issues.LabelIssues
    C : float
        The classifier's C.
    duplicates : dict
        ``label_issues.different_label_duplicates`` of the inputs' near-duplicate groups.
    """
    labels = [label_of(k) for k in inputs.keys]
    proba, classes, C = label_issues.out_of_sample_probabilities(
        inputs.embeddings, labels, inputs.splits, C_candidates, n_folds, random_state, n_jobs=-1,
        n_repeats=n_repeats, C_criterion=C_criterion)
    duplicates = label_issues.different_label_duplicates(inputs.near_duplicates, label_of)
    issues = label_issues.find_label_issues(inputs.keys, inputs.splits, labels, proba, classes, ranked_by, duplicates)
    return issues, C, duplicates


def save_label_issue_sheet(path, issues, img_dir, n_shown, ranked_by):
    """The contact sheet of the ``n_shown`` first suspects (images under ``img_dir``); returns how many (0: none
    written)."""
    from ..data.images import load_image
    from . import plots

    shown = issues.rows[:n_shown]
    if shown:
        plots.plot_contact_sheet([(load_image(img_dir / row["key"]),
                                   f"{row['rank']}. {row['key'].split('/')[-1]} ({row['split']})\n"
                                   f"given {row['given_label']} p={row['p_given_label']:.2f}\n"
                                   f"suggested {row['suggested_label']}") for row in shown], path,
                                 title=f"Top {len(shown)} label-issue suspects ({ranked_by})")
    return len(shown)


def labelled_images(img_dir, skipped):
    """The image files of ``img_dir`` inside a label folder (``img_dir/<label>/...``); the others are recorded in
    ``skipped`` as "not inside a label folder"."""
    from ..data.images import list_images

    paths = list_images(img_dir, skipped=skipped) if img_dir.is_dir() else []
    labelled = [path for path in paths if len(path.relative_to(img_dir).parts) > 1]
    for path in sorted(set(paths) - set(labelled)):
        skipped.add(path, "not inside a label folder")
    return labelled


def sql_evaluation_table(engine, top_ns):
    """The SQL variant's ``evaluation_results`` as one row per (split, ranker): top-N, mean/median rank, MRR and
    the query count, as a pandas DataFrame."""
    import pandas as pd

    from ..apps import store

    with engine.connect() as conn:
        table = pd.read_sql(store.evaluation_results.select(), conn)
    table = table.pivot(index=["split", "ranker"], columns="metric", values="value")
    return table[[f"top{n}" for n in top_ns] + ["mean_rank", "median_rank", "mrr", "n_queries"]]


def refine_items(layout, excluded=frozenset()):
    """Step 2's classes and ``(key, class id)`` items of train and val, without the ``excluded`` keys.

    Returns
    -------
    classes : list of str
        In class id order (step 1's ``lutLabel2Id.json``).
    items : dict
        ``{'train': [(key, id), ...], 'val': [...]}``, labels sorted, keys in step 1's order.
    """
    label_to_id = fileio.load_json(layout.label_to_id, "1_prepareData.py")
    if not isinstance(label_to_id, dict) or not all(isinstance(i, int) for i in label_to_id.values()):
        raise ValueError(f"{layout.label_to_id}: not a label table written by 1_prepareData.py: run it again")
    items = {split: [(key, label_to_id[label]) for label, keys in sorted(load_split(layout.split_keys[split]).items())
                     for key in keys if key not in excluded] for split in ("train", "val")}
    return sorted(label_to_id, key=label_to_id.get), items


def earlier_skipped(path):
    """A :class:`SkippedImages` holding what earlier steps recorded in ``path`` (empty when it is absent)."""
    from ..data.images import SkippedImages

    skipped = SkippedImages()
    if path.exists():
        for image, reason in fileio.read_tsv(path)[1:]:
            skipped.add(image, reason)
    return skipped


def save_refined(layout, result, config, classes, comparison, pretrained_ranks_better):
    """Write step 2's refined checkpoint (with its validation facts), its log and its curves.

    Parameters
    ----------
    result : refine.RefineResult
    config : refine.RefineConfig
    classes : list of str
    comparison : dict
        ``refine.compare_on_validation``'s cosine ranking of the validation sets, refined against pretrained.
    pretrained_ranks_better : bool
        Recorded for :func:`.runs.featurizing_model`.
    """
    from ..models import checkpoints, refine
    from . import plots

    meta = {"epoch": result.best_epoch, "val_accuracy": result.best_val_accuracy, "val_loss": result.best_val_loss,
            "n_train": result.n_train, "n_val": result.n_val, "train_params": config.as_dict(),
            "val_ranking": comparison, "pretrained_ranks_better": pretrained_ranks_better}
    checkpoints.save_checkpoint(layout.model, result.model, config.backbone, classes, config.data_config, meta)
    fileio.save_csv(layout.refine_log, refine.LOG_COLUMNS, [[row[c] for c in refine.LOG_COLUMNS]
                                                           for row in result.log_rows])
    plots.plot_refine_curves(result.log_rows, layout.refine_curves)


def best_on_validation(val_results):
    """The ranker validation chooses: the best top-1, then the lowest mean rank; never the random baseline.

    Parameters
    ----------
    val_results : dict
        ``{ranker: evaluation.evaluate(...)}`` on the validation ranking sets (never the test split).
    """
    return min((n for n in val_results if n != "random"),
               key=lambda n: (-val_results[n]["top1"], val_results[n]["mean_rank"]))


def _columns(top_ns):
    return [f"top{n}" for n in top_ns] + ["mean_rank", "median_rank", "mrr"]


def evaluation_table(results, top_ns, best):
    """Step 5's table as text lines: one row per ranker (top-N in %, mean and median rank, MRR), ``best`` marked."""
    columns = _columns(top_ns)
    lines = [f"{'ranker':17}" + "".join(f"{c.replace('_rank', ''):>8}" for c in columns)]
    for name, m in results.items():
        lines.append(f"{name:17}" + "".join(f"{100 * m[c]:7.1f}%" for c in columns[:-3])
                     + f"{m['mean_rank']:8.2f}{m['median_rank']:8.1f}{m['mrr']:8.3f}"
                     + ("  <- best on val" * (name == best)))
    return lines


def save_evaluation(layout, results, ranks, top_ns, best, model_id, split):
    """Write step 5's evaluation.json and .csv (``best_on_val`` marked), its two figures, and record ``best`` and
    ``model_id`` in the run's ``run.json`` (A1 and the service recommend from it).

    Parameters
    ----------
    results : dict
        ``{ranker: metrics}`` on ``split``.
    ranks : dict
        ``{ranker: ndarray of the positive's ranks}`` on ``split``.
    """
    from . import plots

    columns = _columns(top_ns)
    extra = [c for c in next(iter(results.values())) if c not in (*columns, "n_queries")]
    fileio.save_json(layout.evaluation_json, results)
    fileio.save_csv(layout.evaluation_csv, ["ranker", *columns, *extra, "n_queries", "best_on_val"],
                    [[name, *(m[c] for c in columns), *(m.get(c) for c in extra), m["n_queries"], int(name == best)]
                     for name, m in results.items()])
    plots.plot_top_n_curves(results, top_ns, layout.top_n_plot, title=f"Top-N accuracy ({split} split)")
    plots.plot_rank_histogram(ranks, layout.rank_histogram, title=f"Rank of the positive ({split} split)")
    layout.save_record(model_id=model_id, best_on_val=best)
