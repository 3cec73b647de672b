"""The SQL variant's database: every step of the pipeline reads its inputs from tables and writes its outputs to tables.

This is Microsoft's "Image Similarity with SQL Server Machine Learning Services" layout, on any database SQLAlchemy
reaches (SQLite by default, PostgreSQL with ``postgresql://...``). Tables, by the step that writes them:

1. ``ImageStore`` (``id``, ``path`` = image key, ``label``): one row per image file in a label folder;
   ``features`` (``image_id``, ``model_id``, ``dim``, ``vector``): one row per readable image, the float32 embedding
   as ``ndarray.tobytes()`` (native little-endian byte order, ``dim * 4`` bytes).
2. ``training_images``, ``evaluation_images``, ``testing_images`` (``image_id``): the train, validation (used to
   choose C) and test splits; ``query_images`` (``split``, ``set_id``, ``position``, ``query_id``,
   ``reference_id``, ``is_positive``): the ranking sets of the validation and test splits, one row per reference, in
   the set's (shuffled) reference order.
3. ``model`` (``name``, ``model_id``, ``payload``): the class-probability classifier payload
   (``{'model_id', 'ranker': ClassProbRanker, 'C_table', 'accuracy', 'hybrid_band', 'hybrid_table'}``) in the bytes
   ``4_trainSvm.py`` writes to its file (``ranker_files.payload_bytes``, skops: read back without running code).
4. ``scores`` (``image_id``, ``class_index``, ``label``, ``score``): one row per (image, class): the classifier's
   probability of that class, so ``n_features x n_classes`` rows.
5. ``evaluation_results`` (``split``, ``ranker``, ``metric``, ``value``): ``evaluation.evaluate`` of the positive
   ranks under the ``hybrid`` ranker (labels first, the embeddings' cosine within a label; when step 3 chose its
   band) and L2, cosine and 1 - P(same label) between score vectors (``classprob_L2``, ``classprob_cosine``,
   ``classprob_same``).
6. ``ranking_results`` (``ranker``, ``query_id``, ``rank``, ``candidate_id``, ``distance``, ``same_label``): the
   ``k`` closest scored images to every test query image, for each of those rankers (``hybrid`` the recommended one),
   or for rankers named from the registry (``rankers.ranker_names``; those that need no colour histograms or SVM),
   found by ``core.search`` as every other door finds them.

Each step writes in one transaction: it deletes its own tables' rows and those of the steps that depend on it
(they are stale), then inserts, so a re-run replaces its output and never duplicates rows.
"""
import importlib.util
import logging

import numpy as np
from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table,
                        create_engine, delete, func, insert, make_url, select)
from sqlalchemy.exc import ArgumentError, DBAPIError

from ..pipeline import evaluation, steps
from ..search import rankers
from ..search import ranker_files
from ..search.distances import ProbabilityDistance
from ..search.core import Gallery, resolve_ranker, search_keys
from ..search.rankers import HybridRanker
from ..data.features import Features
from ..data.splits import SPLITS, RankingSet, group_by_label, label_of, splits_and_ranking_sets

__all__ = ["metadata", "STEP_TABLES", "connect", "describe_url", "SCORE_RANKERS",
           "write_image_store", "read_features", "write_splits", "read_split", "read_ranking_sets",
           "train_classifier", "read_model", "write_scores", "read_scores", "evaluate_scores", "rank_candidates",
           "count_rows"]

logger = logging.getLogger(__name__)
_STEP3 = "step 3 (A3_sqlPipeline.py --steps 3)"

metadata = MetaData()
_IMAGE_ID = "ImageStore.id"
image_store = Table("ImageStore", metadata,
                    Column("id", Integer, primary_key=True, autoincrement=False),
                    Column("path", String(1024), nullable=False, unique=True),
                    Column("label", String(255), nullable=False))
features_table = Table("features", metadata,
                       Column("image_id", Integer, ForeignKey(_IMAGE_ID), primary_key=True, autoincrement=False),
                       Column("model_id", String(255), nullable=False),
                       Column("dim", Integer, nullable=False),
                       Column("vector", LargeBinary, nullable=False))
split_tables = {split: Table(name, metadata, Column("image_id", Integer, ForeignKey(_IMAGE_ID), primary_key=True,
                                                    autoincrement=False))
                for split, name in (("train", "training_images"), ("val", "evaluation_images"),
                                    ("test", "testing_images"))}
query_images = Table("query_images", metadata,
                     Column("split", String(8), primary_key=True),
                     Column("set_id", Integer, primary_key=True, autoincrement=False),
                     Column("position", Integer, primary_key=True, autoincrement=False),
                     Column("query_id", Integer, ForeignKey(_IMAGE_ID), nullable=False),
                     Column("reference_id", Integer, ForeignKey(_IMAGE_ID), nullable=False),
                     Column("is_positive", Boolean, nullable=False))
model_table = Table("model", metadata,
                    Column("name", String(64), primary_key=True),
                    Column("model_id", String(255), nullable=False),
                    Column("payload", LargeBinary, nullable=False))
scores_table = Table("scores", metadata,
                     Column("image_id", Integer, ForeignKey(_IMAGE_ID), primary_key=True, autoincrement=False),
                     Column("class_index", Integer, primary_key=True, autoincrement=False),
                     Column("label", String(255), nullable=False),
                     Column("score", Float(53), nullable=False))
evaluation_results = Table("evaluation_results", metadata,
                           Column("split", String(8), primary_key=True),
                           Column("ranker", String(64), primary_key=True),
                           Column("metric", String(32), primary_key=True),
                           Column("value", Float(53), nullable=False))
ranking_results = Table("ranking_results", metadata,
                        Column("ranker", String(64), primary_key=True),
                        Column("query_id", Integer, ForeignKey(_IMAGE_ID), primary_key=True, autoincrement=False),
                        Column("rank", Integer, primary_key=True, autoincrement=False),
                        Column("candidate_id", Integer, ForeignKey(_IMAGE_ID), nullable=False),
                        Column("distance", Float(53), nullable=False),
                        Column("same_label", Boolean, nullable=False))

STEP_TABLES = {1: (image_store, features_table), 2: (*split_tables.values(), query_images), 3: (model_table,),
               4: (scores_table,), 5: (evaluation_results,), 6: (ranking_results,)}
# The steps whose output goes stale when a step rewrites its own (5 and 6 both read steps 2 and 4, not each other).
_STALE_AFTER = {1: (1, 2, 3, 4, 5, 6), 2: (2, 3, 4, 5, 6), 3: (3, 4, 5, 6), 4: (4, 5, 6), 5: (5,), 6: (6,)}
MODEL_NAME = "classprob"
SCORE_RANKERS = rankers.CLASSPROB_METRICS


def describe_url(url):
    """The database URL as text with any password masked."""
    return make_url(url).render_as_string(hide_password=True)


def connect(url):
    """An Engine for ``url`` with every table created (existing tables are kept).

    Parameters
    ----------
    url : str
        An SQLAlchemy URL: ``sqlite:///path/file.sqlite``, ``postgresql://user@host:port/db`` ...

    Raises
    ------
    ValueError
        One line naming the URL (password masked) and the reason: not a URL, unknown dialect or missing driver,
        or the server / file cannot be opened.
    """
    parsed = None
    try:
        parsed = make_url(url)
        if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg") is None:
            parsed = parsed.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
        engine = create_engine(parsed)
    except (ArgumentError, ImportError) as err:
        shown = describe_url(parsed) if parsed is not None else url
        raise ValueError(f"{shown!r} is not a usable database URL ({err}); expected e.g. "
                         "sqlite:///path/file.sqlite or postgresql://user@host:port/database") from None
    try:
        metadata.create_all(engine)
    except DBAPIError as err:
        engine.dispose()
        reason = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
        raise ValueError(f"cannot open the database {describe_url(parsed)}: {reason}") from None
    return engine


def count_rows(engine):
    """``{table name: row count}`` for every table of the variant, in step order."""
    with engine.connect() as conn:
        return {table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for tables in STEP_TABLES.values() for table in tables}


def _replace(conn, step, rows_by_table):
    """Delete the rows of ``step`` and of the steps it makes stale, then insert ``{table: list of dicts}``."""
    stale = [table for later in _STALE_AFTER[step] for table in STEP_TABLES[later]]
    for table in reversed(metadata.sorted_tables):
        if table in stale:
            conn.execute(delete(table))
    for table in metadata.sorted_tables:
        if rows_by_table.get(table):
            conn.execute(insert(table), rows_by_table[table])


def _require_rows(rows, table, step):
    if not rows:
        raise ValueError(f"table {table.name} is empty: run step {step} of A3_sqlPipeline.py first")
    return rows


def write_image_store(engine, image_keys, feature_keys, matrix, model_id):
    """Step 1's output: ``ImageStore`` and ``features``, in one transaction.

    Parameters
    ----------
    image_keys : list of str
        Every image file in a label folder ('label/file.jpg'); ids are assigned 1.. in sorted key order.
    feature_keys : list of str
        The readable images among them, one per row of ``matrix``.
    matrix : ndarray of shape (len(feature_keys), D)
        Stored as float32.
    model_id : str
        What produced the features (``backbones.model_id``).

    Returns
    -------
    dict of str to int
        ``{path: id}``.
    """
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or len(matrix) != len(feature_keys):
        raise ValueError(f"{len(feature_keys)} feature keys for a matrix of shape {matrix.shape}")
    ids = {key: i for i, key in enumerate(sorted(set(image_keys)), 1)}
    unknown = [key for key in feature_keys if key not in ids]
    if unknown:
        raise ValueError(f"{len(unknown)} featurized image(s) are not in the image list, e.g. {unknown[0]}")
    dim = int(matrix.shape[1])
    with engine.begin() as conn:
        _replace(conn, 1, {
            image_store: [{"id": i, "path": key, "label": label_of(key)} for key, i in ids.items()],
            features_table: [{"image_id": ids[key], "model_id": model_id, "dim": dim, "vector": row.tobytes()}
                             for key, row in zip(feature_keys, matrix)]})
    return ids


def _paths(conn):
    return dict(conn.execute(select(image_store.c.id, image_store.c.path)).all())


def read_features(conn):
    """The ``features`` table as :class:`features.Features` (keys in image id order, float32 (N, D) matrix).

    ``meta`` holds ``model_id`` and ``dim``; a blob of the wrong length or mixed model ids is a ValueError.
    """
    rows = _require_rows(conn.execute(
        select(image_store.c.path, features_table.c.model_id, features_table.c.dim, features_table.c.vector)
        .join(image_store, image_store.c.id == features_table.c.image_id).order_by(image_store.c.id)).all(),
        features_table, 1)
    model_ids, dims = {row.model_id for row in rows}, {row.dim for row in rows}
    if len(model_ids) != 1 or len(dims) != 1:
        raise ValueError(f"table features mixes model ids {sorted(model_ids)} / dims {sorted(dims)}: run step 1 again")
    dim = dims.pop()
    bad = [row.path for row in rows if len(row.vector) != 4 * dim]
    if bad:
        raise ValueError(f"table features: the vector of {bad[0]} is not {dim} float32 values ({len(bad)} such rows)")
    matrix = np.frombuffer(b"".join(row.vector for row in rows), dtype=np.float32).reshape(len(rows), dim)
    return Features([row.path for row in rows], matrix, {"model_id": model_ids.pop(), "dim": dim})


def write_splits(engine, ratio_train, ratio_val, max_queries, max_negatives, split_by="filename",
                 split_file_rows=None, seed=0):
    """Step 2: split the featurized images and build the validation and test ranking sets, as 1_prepareData.py.

    The images are those of the ``features`` table; ``ImageStore`` images without features are excluded. The
    splits and sets come from :func:`splits.splits_and_ranking_sets`, as in 1_prepareData.py, so the same images
    give the same splits and sets.

    Parameters
    ----------
    ratio_train, ratio_val, max_queries, max_negatives, split_by, split_file_rows, seed
        As :func:`splits.splits_and_ranking_sets`.

    Returns
    -------
    splits : dict
        ``{split: {label: keys}}``.
    sets : dict
        ``{split: list of RankingSet}``; train's sets are drawn (to keep the random sequence) but not stored.
    """
    with engine.connect() as conn:
        keys = read_features(conn).keys
        paths = _paths(conn)
    ids = {key: i for i, key in paths.items()}
    splits, sets = splits_and_ranking_sets(group_by_label(keys), ratio_train, ratio_val, max_queries, max_negatives,
                                           split_by, split_file_rows, seed, excluded_keys=set(ids) - set(keys))
    rows = {split_tables[split]: [{"image_id": ids[k]} for label in sorted(splits[split]) for k in splits[split][label]]
            for split in SPLITS}
    rows[query_images] = [{"split": split, "set_id": n, "position": position, "query_id": ids[s.query],
                           "reference_id": ids[ref], "is_positive": bool(positive)}
                          for split in ("val", "test") for n, s in enumerate(sets[split])
                          for position, (ref, positive) in enumerate(zip(s.references, s.is_positive))]
    with engine.begin() as conn:
        _replace(conn, 2, rows)
    return splits, sets


def read_split(conn, split):
    """``{label: sorted keys}`` of one split ('train', 'val' or 'test') from its table."""
    table = split_tables[split]
    rows = conn.execute(select(image_store.c.label, image_store.c.path)
                        .join(table, table.c.image_id == image_store.c.id).order_by(image_store.c.path)).all()
    keys_by_label = {}
    for label, key in rows:
        keys_by_label.setdefault(label, []).append(key)
    return keys_by_label


def read_ranking_sets(conn, split):
    """The ranking sets of 'val' or 'test' from ``query_images``, references in their stored order.

    ``negatives`` are the non-positive references in that order (their draw order is not stored; no metric uses it).
    """
    paths = _paths(conn)
    sets = []
    for row in conn.execute(select(query_images).where(query_images.c.split == split)
                            .order_by(query_images.c.set_id, query_images.c.position)).all():
        if row.position == 0:
            sets.append(RankingSet(paths[row.query_id], None))
        ranking_set, reference = sets[-1], paths[row.reference_id]
        ranking_set.references.append(reference)
        if row.is_positive:
            ranking_set.positive = reference
        else:
            ranking_set.negatives.append(reference)
    return sets


def train_classifier(engine, C_candidates, random_state=None, hybrid_bands=(), max_top1_drop=0.01,
                     max_mean_rank_rise=0.1, C_criterion="log_loss"):
    """Step 3: the class-probability classifier of 4_trainSvm.py (``steps.train_classprob``) into ``model``.

    Trained on ``training_images``, C chosen by ``C_criterion`` ('log_loss' or 'accuracy', as step 4) on
    ``evaluation_images`` (the validation split); the hybrid ranker's band chosen on the validation ranking sets
    (``training.select_hybrid_band``) when ``hybrid_bands`` are given.

    Returns
    -------
    dict
        The stored payload: ``{'model_id', 'ranker': ClassProbRanker, 'C_table', 'C_criterion',
        'accuracy': {split: fraction}, 'hybrid_band': float or None, 'hybrid_table'}``.
    """
    with engine.connect() as conn:
        feats = read_features(conn)
        keys = {split: [k for label in sorted(d) for k in d[label]]
                for split, d in ((s, read_split(conn, s)) for s in SPLITS)}
        val_sets = read_ranking_sets(conn, "val")
    _require_rows(keys["train"], split_tables["train"], 2)
    if not keys["val"]:
        raise ValueError("table evaluation_images is empty: the classifier's C is chosen on the validation split "
                         "(run step 2 with ratioValFromTrain > 0)")
    xy = {split: (feats.rows(keys[split]), [label_of(k) for k in keys[split]])
          for split in SPLITS if keys[split]}
    payload = {"model_id": feats.meta["model_id"], **steps.train_classprob(
        xy, feats, val_sets, C_candidates, random_state, C_criterion, hybrid_bands, max_top1_drop, max_mean_rank_rise)}
    with engine.begin() as conn:
        _replace(conn, 3, {model_table: [{"name": MODEL_NAME, "model_id": payload["model_id"],
                                          "payload": ranker_files.payload_bytes(**payload)}]})
    return payload


def read_model(conn, model_id=None):
    """The classifier payload from ``model``; refused (ValueError) when trained on another ``model_id``'s features."""
    row = conn.execute(select(model_table).where(model_table.c.name == MODEL_NAME)).one_or_none()
    _require_rows(row, model_table, 3)
    if model_id is not None and row.model_id != model_id:
        raise ValueError(f"table model holds a classifier trained on features of {row.model_id} but the features "
                         f"are from {model_id}: run step 3 again")
    return ranker_files.read_payload(row.payload, f"table model, row name={MODEL_NAME!r}", written_by=_STEP3)


def write_scores(engine):
    """Step 4: every featurized image's class probabilities into ``scores`` (n_images x n_classes rows).

    Returns
    -------
    Features
        Keys in image id order; matrix (n_images, n_classes) float64; ``meta['classes']``.
    """
    with engine.connect() as conn:
        feats = read_features(conn)
        classifier = read_model(conn, feats.meta["model_id"])["ranker"]
        ids = {key: i for i, key in _paths(conn).items()}
    probabilities = classifier.predict_proba(feats.matrix)
    classes = [str(c) for c in classifier.classes_]
    with engine.begin() as conn:
        _replace(conn, 4, {scores_table: [
            {"image_id": ids[key], "class_index": j, "label": classes[j], "score": float(p)}
            for key, row in zip(feats.keys, probabilities) for j, p in enumerate(row)]})
    return Features(feats.keys, probabilities, {"classes": classes})


def read_scores(conn):
    """The ``scores`` table as :class:`features.Features`: (n_images, n_classes) float64 in image id order."""
    rows = _require_rows(conn.execute(
        select(image_store.c.path, scores_table.c.class_index, scores_table.c.label, scores_table.c.score)
        .join(image_store, image_store.c.id == scores_table.c.image_id)
        .order_by(image_store.c.id, scores_table.c.class_index)).all(), scores_table, 4)
    classes = dict(sorted({(row.class_index, row.label) for row in rows}))
    if list(classes) != list(range(len(classes))) or len(rows) % len(classes):
        raise ValueError(f"table scores: {len(rows)} rows do not hold one score per image for {len(classes)} classes")
    matrix = np.array([row.score for row in rows], dtype=np.float64).reshape(-1, len(classes))
    return Features([row.path for row in rows[::len(classes)]], matrix, {"classes": list(classes.values())})


def _rankers(conn):
    """``{name: (ranker, stored vectors it ranks)}``: the hybrid on the features (when step 3 chose its band), then
    the distances of ``SCORE_RANKERS`` on the scores."""
    scores = read_scores(conn)
    found = {}
    payload = read_model(conn)
    if payload.get("hybrid_band") is not None:
        found["hybrid"] = (HybridRanker(payload["ranker"], payload["hybrid_band"]).fit(), read_features(conn))
    found.update((name, (ProbabilityDistance(metric), scores)) for name, metric in SCORE_RANKERS.items())
    return found


def evaluate_scores(engine, top_ns, splits=("val", "test")):
    """Step 5: rank every ranking set's references by the hybrid and each distance of ``SCORE_RANKERS``.

    Returns
    -------
    dict
        ``{split: {ranker: {'top1', ..., 'mean_rank', 'median_rank', 'mrr', 'n_queries'}}}`` for the splits with
        ranking sets (``evaluation.evaluate``), also written to ``evaluation_results`` as one row per (split, ranker,
        metric).
    """
    with engine.connect() as conn:
        by_name = _rankers(conn)
        sets = {split: read_ranking_sets(conn, split) for split in splits}
    if not any(sets.values()):
        raise ValueError(f"table query_images holds no {' or '.join(splits)} ranking sets: run step 2 (a label "
                         "needs two images in a split to give queries)")
    results = {split: {name: evaluation.evaluate(evaluation.rank_ranking_sets(ranker, vectors, sets[split]), top_ns)
                       for name, (ranker, vectors) in by_name.items()} for split in splits if sets[split]}
    with engine.begin() as conn:
        _replace(conn, 5, {evaluation_results: [
            {"split": split, "ranker": name, "metric": metric, "value": float(value)}
            for split, by_ranker in results.items() for name, metrics in by_ranker.items()
            for metric, value in metrics.items()]})
    return results


def rank_candidates(engine, k, ranker_names=None):
    """Step 6: the ``k`` images closest to every test query image (itself excluded), for each ranker.

    Parameters
    ----------
    k : int
    ranker_names : list of str, optional
        Registered rankers (``rankers.ranker_names``) ranking the stored features, built with the ``model``
        table's classifier (``core.resolve_ranker``); default the hybrid and the distances of ``SCORE_RANKERS``
        on the scores.

    Returns
    -------
    dict
        ``{ranker: {query key: [(candidate key, distance), ...]}}`` (``hybrid`` first when step 3 chose its band),
        also written to ``ranking_results``.
    """
    with engine.connect() as conn:
        if ranker_names:
            available, vectors = rankers.build_rankers(classprob_payload=read_model(conn)), read_features(conn)
            by_name = {name: (resolve_ranker(name, available), vectors) for name in ranker_names}
        else:
            by_name = _rankers(conn)
        queries = sorted({s.query for s in read_ranking_sets(conn, "test")})
        ids = {key: i for i, key in _paths(conn).items()}
    if not queries:
        raise ValueError("table query_images holds no test ranking sets: run step 2 (a label needs two test images "
                         "to give queries)")
    found = {}
    for name, (ranker, vectors) in by_name.items():
        results = search_keys(Gallery.from_features(vectors), ranker, queries, k)
        found[name] = {query: results.matches(i) for i, query in enumerate(queries)}
    with engine.begin() as conn:
        _replace(conn, 6, {ranking_results: [
            {"ranker": name, "query_id": ids[query], "rank": n, "candidate_id": ids[key], "distance": distance,
             "same_label": label_of(key) == label_of(query)}
            for name, by_query in found.items() for query, matches in by_query.items()
            for n, (key, distance) in enumerate(matches, 1)]})
    return found
