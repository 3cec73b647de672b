"""image_similarity.apps.store on SQLite and on a real PostgreSQL server started for the tests (synthetic embeddings)."""
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from image_similarity.pipeline import evaluation
from image_similarity.apps import store
from image_similarity.search.distances import ProbabilityDistance
from image_similarity.data.features import Features
from image_similarity.search.rankers import HybridRanker
from image_similarity.data.splits import SPLITS, label_of, make_ranking_sets, split_images

LABELS = ("dotted", "leopard", "striped")
TOP_NS = [1, 2, 4, 5, 8, 10, 15, 20, 28, 32]
SPLIT_ARGS = dict(ratio_train=0.75, ratio_val=0.3, seed=3, max_queries={"train": 4, "val": 4, "test": 4},
                  max_negatives={"train": 6, "val": 6, "test": 6})
COLUMNS = {"ImageStore": {"id", "path", "label"}, "features": {"image_id", "model_id", "dim", "vector"},
           "training_images": {"image_id"}, "evaluation_images": {"image_id"}, "testing_images": {"image_id"},
           "query_images": {"split", "set_id", "position", "query_id", "reference_id", "is_positive"},
           "model": {"name", "model_id", "payload"}, "scores": {"image_id", "class_index", "label", "score"},
           "evaluation_results": {"split", "ranker", "metric", "value"},
           "ranking_results": {"ranker", "query_id", "rank", "candidate_id", "distance", "same_label"}}


def _postgres_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).resolve().parent if pg_ctl else None


@contextlib.contextmanager
def running_postgres():
    """Start a throw-away PostgreSQL server on 127.0.0.1 and yield a URL to its ``postgres`` database.

    initdb and pg_ctl refuse to run as root, so as root they run as the ``postgres`` user (``runuser``) in a
    folder it owns. The server is stopped and its folder removed on exit, whatever happened inside.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql to run this")
    prefix, owner = [], None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the PostgreSQL server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as 'postgres'")
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="a3_postgres_"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        try:
            subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                            "-E", "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, text=True)
            options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
                            "start"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as err:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"{err.cmd[len(prefix)]} failed: {err.stderr}{server_log}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def create_database(server_url, name):
    """CREATE DATABASE ``name`` on the server; returns its URL."""
    admin = create_engine(server_url.replace("postgresql://", "postgresql+psycopg2://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def postgres_server():
    with running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        url = create_database(request.getfixturevalue("postgres_server"), f"t_{request.node.name[-40:]}".lower()
                              .replace("[", "_").replace("]", "").replace("-", "_"))
    engine = store.connect(url)
    yield engine
    engine.dispose()


def synthetic(n_per_label=10, dim=16, seed=0):
    """Image keys in three labels and clustered float32 embeddings (one centre per label)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(LABELS), dim))
    keys = [f"{label}/{label}_{i:02d}.jpg" for label in LABELS for i in range(n_per_label)]
    matrix = np.vstack([centres[LABELS.index(label_of(k))] + 0.6 * rng.normal(size=dim) for k in keys])
    return keys, matrix.astype(np.float32)


def run_all(engine, unreadable=("striped/broken.jpg",)):
    keys, matrix = synthetic()
    store.write_image_store(engine, keys + list(unreadable), keys, matrix, "pretrained:test")
    splits, sets = store.write_splits(engine, **SPLIT_ARGS)
    payload = store.train_classifier(engine, [0.1, 10.0], random_state=0, hybrid_bands=[0.1, 0.2])
    scores = store.write_scores(engine)
    results = store.evaluate_scores(engine, TOP_NS)
    found = store.rank_candidates(engine, 5)
    return dict(keys=keys, matrix=matrix, splits=splits, sets=sets, payload=payload, scores=scores, results=results,
                found=found)


def test_every_table_has_its_columns(engine):
    tables = inspect(engine).get_table_names()
    assert set(COLUMNS) <= set(tables)
    for name, columns in COLUMNS.items():
        assert {c["name"] for c in inspect(engine).get_columns(name)} == columns, name


def test_features_round_trip_bit_exact(engine):
    keys, matrix = synthetic()
    ids = store.write_image_store(engine, [*keys, "dotted/bad.png"], keys[::-1], matrix[::-1], "sha256:abc")
    assert ids["dotted/bad.png"] == 1 + sorted([*keys, "dotted/bad.png"]).index("dotted/bad.png")
    with engine.connect() as conn:
        feats = store.read_features(conn)
        labels = dict(conn.execute(select(store.image_store.c.path, store.image_store.c.label)).all())
    assert feats.keys == sorted(keys)  # image id order
    assert feats.matrix.dtype == np.float32 and np.array_equal(feats.rows(keys), matrix)
    assert feats.meta == {"model_id": "sha256:abc", "dim": 16}
    assert labels["dotted/bad.png"] == "dotted" and len(labels) == len(keys) + 1


def test_full_chain_counts_and_consistency(engine):
    out = run_all(engine)
    counts = store.count_rows(engine)
    n, n_classes = len(out["keys"]), len(LABELS)
    n_sets = {split: len(out["sets"][split]) for split in ("val", "test")}
    n_test_queries = len({s.query for s in out["sets"]["test"]})
    n_rankers = len(store.SCORE_RANKERS) + 1  # and the hybrid
    assert counts == {"ImageStore": n + 1, "features": n,
                      "training_images": sum(map(len, out["splits"]["train"].values())),
                      "evaluation_images": sum(map(len, out["splits"]["val"].values())),
                      "testing_images": sum(map(len, out["splits"]["test"].values())),
                      "query_images": 7 * (n_sets["val"] + n_sets["test"]), "model": 1, "scores": n * n_classes,
                      "evaluation_results": 2 * n_rankers * (len(TOP_NS) + 4),
                      "ranking_results": n_rankers * n_test_queries * 5}
    assert counts["training_images"] + counts["evaluation_images"] + counts["testing_images"] == n
    assert n_sets["val"] > 0 and n_sets["test"] > 0


def test_splits_and_ranking_sets_match_pairs(engine):
    out = run_all(engine)
    keys_by_label = {label: [k for k in out["keys"] if k.startswith(label)] for label in LABELS}
    expected = split_images(keys_by_label, 0.75, 0.3, seed=3, excluded_keys={"striped/broken.jpg"})
    rng = np.random.default_rng(3)
    expected_sets = {split: make_ranking_sets(expected[split], 4, 6, rng) for split in SPLITS}
    with engine.connect() as conn:
        for split in SPLITS:
            assert store.read_split(conn, split) == {k: v for k, v in expected[split].items() if v}, split
        for split in ("val", "test"):
            stored = store.read_ranking_sets(conn, split)
            assert [(s.query, s.positive, s.references) for s in stored] == \
                [(s.query, s.positive, s.references) for s in expected_sets[split]]
            assert all(sorted(s.negatives) == sorted(e.negatives) for s, e in zip(stored, expected_sets[split]))


def test_scores_are_the_classifier_probabilities(engine):
    out = run_all(engine)
    with engine.connect() as conn:
        payload = store.read_model(conn, "pretrained:test")
        scores = store.read_scores(conn)
        with pytest.raises(ValueError, match="trained on features of pretrained:test"):
            store.read_model(conn, "sha256:other")
    assert payload["C_table"] == out["payload"]["C_table"] and set(payload["accuracy"]) == set(SPLITS)
    assert payload["C_criterion"] == "log_loss" and payload["ranker"].C == max(payload["C_table"],
                                                                               key=payload["C_table"].get)
    assert scores.meta["classes"] == list(LABELS)
    expected = payload["ranker"].predict_proba(np.vstack([out["matrix"][out["keys"].index(k)] for k in scores.keys]))
    np.testing.assert_array_equal(scores.matrix, expected)  # float64 stored exactly
    np.testing.assert_allclose(scores.matrix.sum(1), 1.0)


def test_evaluation_equals_evaluate_on_classifier_ranks(engine):
    out = run_all(engine)
    with engine.connect() as conn:
        feats = store.read_features(conn)
        classifier = store.read_model(conn)["ranker"]
        stored = {(r.split, r.ranker, r.metric): r.value for r in conn.execute(select(store.evaluation_results))}
    for split in ("val", "test"):
        for name, metric in store.SCORE_RANKERS.items():
            ranks = evaluation.rank_ranking_sets(classifier.set_params(metric=metric), feats, out["sets"][split])
            expected = evaluation.evaluate(ranks, TOP_NS)
            assert out["results"][split][name] == expected
            assert {m: stored[(split, name, m)] for m in expected} == pytest.approx(expected, abs=0, rel=1e-12)
        hybrid = HybridRanker(classifier, out["payload"]["hybrid_band"]).fit()
        assert out["results"][split]["hybrid"] == evaluation.evaluate(
            evaluation.rank_ranking_sets(hybrid, feats, out["sets"][split]), TOP_NS)


def test_ranking_results_are_the_closest_scores(engine):
    out = run_all(engine)
    scores = out["scores"]
    test_queries = sorted({s.query for s in out["sets"]["test"]})
    with engine.connect() as conn:
        rows = conn.execute(select(store.ranking_results).order_by(store.ranking_results.c.ranker,
                                                                   store.ranking_results.c.query_id,
                                                                   store.ranking_results.c.rank)).all()
        paths = dict(conn.execute(select(store.image_store.c.id, store.image_store.c.path)).all())
    assert {paths[r.query_id] for r in rows} == set(test_queries)
    for name in store.SCORE_RANKERS:
        for query in test_queries:
            mine = [r for r in rows if r.ranker == name and paths[r.query_id] == query]
            assert [r.rank for r in mine] == [1, 2, 3, 4, 5]
            assert query not in {paths[r.candidate_id] for r in mine}
            distances = [r.distance for r in mine]
            assert distances == sorted(distances)
            others = [k for k in scores.keys if k != query]
            everything = ProbabilityDistance(store.SCORE_RANKERS[name]).distances(scores.rows([query]),
                                                                                 scores.rows(others))[0]
            assert distances == pytest.approx(np.sort(everything)[:5], abs=1e-12)
            assert all(r.same_label == (label_of(paths[r.candidate_id]) == label_of(query)) for r in mine)
    # The recommended hybrid ranker too (first), on the embeddings: labels first, distinct distances within.
    assert list(out["found"])[0] == "hybrid" and out["payload"]["hybrid_band"] in (0.1, 0.2)
    hybrid = HybridRanker(out["payload"]["ranker"], out["payload"]["hybrid_band"]).fit()
    features = Features(out["keys"], out["matrix"], {})
    for query in test_queries:
        mine = [r for r in rows if r.ranker == "hybrid" and paths[r.query_id] == query]
        others = [k for k in out["keys"] if k != query]
        everything = hybrid.distances(features.rows([query]), features.rows(others))[0]
        assert [r.distance for r in mine] == pytest.approx(np.sort(everything)[:5], abs=1e-12)
        assert len({r.distance for r in mine}) == 5


def test_rerun_replaces_rows_and_clears_stale_steps(engine):
    run_all(engine)
    first = store.count_rows(engine)
    run_all(engine)
    assert store.count_rows(engine) == first  # no duplicated rows
    store.write_splits(engine, **{**SPLIT_ARGS, "seed": 4})
    after = store.count_rows(engine)
    assert {name: after[name] for name in ("model", "scores", "evaluation_results", "ranking_results")} == \
        dict.fromkeys(("model", "scores", "evaluation_results", "ranking_results"), 0)
    assert after["ImageStore"] == first["ImageStore"] and after["features"] == first["features"]
    with pytest.raises(ValueError, match="table model is empty: run step 3"):
        store.write_scores(engine)


def test_failed_step_leaves_previous_output(engine):
    keys, matrix = synthetic()
    store.write_image_store(engine, keys, keys, matrix, "pretrained:test")
    before = store.count_rows(engine)
    with pytest.raises(IntegrityError):  # duplicate primary key in features: the insert fails mid-transaction
        store.write_image_store(engine, keys[:3], [keys[0], keys[0]], matrix[:2], "pretrained:other")
    assert store.count_rows(engine) == before
    with engine.connect() as conn:
        assert store.read_features(conn).meta["model_id"] == "pretrained:test"


def test_steps_refuse_missing_inputs(engine):
    with pytest.raises(ValueError, match="table features is empty: run step 1"):
        store.write_splits(engine, **SPLIT_ARGS)
    with pytest.raises(ValueError, match="table scores is empty: run step 4"):
        store.evaluate_scores(engine, TOP_NS)
    with pytest.raises(ValueError, match="3 feature keys for a matrix of shape"):
        store.write_image_store(engine, ["a/1.jpg"], ["a/1.jpg"] * 3, np.zeros((2, 4)), "m")
    with pytest.raises(ValueError, match="not in the image list, e.g. b/2.jpg"):
        store.write_image_store(engine, ["a/1.jpg"], ["b/2.jpg"], np.zeros((1, 4)), "m")


@pytest.mark.parametrize("url, message", [
    ("not a url", "is not a usable database URL"),
    ("nosuchdialect://x/y", "is not a usable database URL"),
    ("sqlite:////nonexistent_dir_a3/x.sqlite", "cannot open the database sqlite:////nonexistent_dir_a3/x.sqlite: "
                                               "unable to open database file"),
])
def test_bad_urls_give_one_line_errors(url, message):
    with pytest.raises(ValueError) as info:
        store.connect(url)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_driver_error_masks_the_password():
    with pytest.raises(ValueError) as info:
        store.connect("mysql+nosuchdriver://user:secret@localhost/db")
    assert "'mysql+nosuchdriver://user:***@localhost/db' is not a usable database URL" in str(info.value)
    assert "secret" not in str(info.value)


def test_unreachable_server_names_it_without_the_password():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ValueError) as info:
        store.connect(f"postgresql://user:secret@127.0.0.1:{port}/db")
    message = str(info.value)
    assert f"cannot open the database postgresql+psycopg2://user:***@127.0.0.1:{port}/db" in message
    assert "secret" not in message and "\n" not in message


def test_without_validation_or_test_sets_the_steps_say_why(engine):
    keys, matrix = synthetic(n_per_label=3)
    store.write_image_store(engine, keys, keys, matrix, "pretrained:test")
    store.write_splits(engine, **{**SPLIT_ARGS, "ratio_train": 1.0, "ratio_val": 0.0})
    with pytest.raises(ValueError, match="table evaluation_images is empty: .*ratioValFromTrain > 0"):
        store.train_classifier(engine, [1.0])
    store.write_splits(engine, **{**SPLIT_ARGS, "ratio_train": 0.7, "ratio_val": 0.5})  # 2 train -> 1 val, 1 test
    store.train_classifier(engine, [1.0])
    store.write_scores(engine)
    with pytest.raises(ValueError, match="holds no val or test ranking sets"):
        store.evaluate_scores(engine, TOP_NS)
    with pytest.raises(ValueError, match="holds no test ranking sets"):
        store.rank_candidates(engine, 3)
