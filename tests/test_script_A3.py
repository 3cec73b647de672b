"""A3_sqlPipeline.py as a subprocess on generated images: SQLite by default, and a real PostgreSQL server."""
import importlib.util

import pytest
from sqlalchemy import inspect, select

import helpers
from conftest import LABEL_LOOKS, REPO, make_image, make_labelled_images, run_script
from image_similarity.pipeline import evaluation
from image_similarity.apps import store
from image_similarity.data.splits import SPLITS, load_ranking_sets, load_split
from test_store import COLUMNS, create_database, running_postgres

TOP_NS = [1, 2, 4, 5, 8, 10, 15, 20, 28, 32]
N_PER_LABEL, N_NEGATIVES, K = 10, 15, 4


def settings(work):
    return ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "ratioValFromTrain=0.3", "--set", "run_nrWorkers=0",
            *(arg for split in SPLITS for arg in ("--set", f"{split}_maxNegImgsPerQueryImg={N_NEGATIVES}")),
            "--set", "svm_classProbCValCandidates=[1.0, 10.0]", "--set", f"TOP_K_CANDIDATES={K}"]


def make_dataset(work):
    root = work / "data" / "tiny"
    make_labelled_images(root, N_PER_LABEL)
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    make_image(root / "loose.jpg", (90, 90, 90))  # not in a label folder: skipped, not in ImageStore


def run_ok(*args):
    result = run_script("A3_sqlPipeline.py", *args)
    assert result.returncode == 0, f"A3_sqlPipeline.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result


def snapshot(engine):
    """Row counts, evaluation results and ranking results of a database."""
    with engine.connect() as conn:
        results = {(r.split, r.ranker, r.metric): r.value for r in conn.execute(select(store.evaluation_results))}
        ranking = sorted(tuple(r) for r in conn.execute(select(store.ranking_results)))
    return store.count_rows(engine), results, ranking


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory):
    """The pipeline on the default SQLite file, run twice; snapshots after each run."""
    work = tmp_path_factory.mktemp("a3")
    make_dataset(work)
    first = run_ok(*settings(work))
    db = work / "proc" / "tiny" / "image_similarity.sqlite"
    engine = store.connect(f"sqlite:///{db}")
    before = snapshot(engine)
    second = run_ok(*settings(work))
    yield work, engine, first, second, before, snapshot(engine)
    engine.dispose()


def test_output_names_every_step_and_ends_with_a_summary(sqlite_run):
    work, _, first, _, _, _ = sqlite_run
    out = first.stdout
    assert f"Database: sqlite:///{work}/proc/tiny/image_similarity.sqlite" in out
    for step in range(1, 7):
        assert f"Step {step}: " in out, step
    assert "classprob_cosine" in out and "top32" in out and "mean_rank" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("Done: steps 1 2 3 4 5 6 on sqlite:///") and "features 30" in last
    assert "broken.jpg" in (work / "results" / "tiny" / "skipped_images.tsv").read_text()


def test_runs_on_its_own_with_the_pretrained_network_and_says_so(sqlite_run, tmp_path):
    """No rf_maxEpochs=0 and no model.pt (step 2 never ran): step 1 embeds with the pretrained backbone."""
    work = sqlite_run[0]
    own = settings(tmp_path)
    del own[own.index("rf_maxEpochs=0") - 1:own.index("rf_maxEpochs=0") + 1]
    (tmp_path / "data").symlink_to(work / "data")
    result = run_ok(*own, "--steps", "1")
    assert "with the pretrained efficientnet_lite0 (no refined network), pretrained:efficientnet_lite0" in result.stdout
    assert not (tmp_path / "proc" / "tiny" / "model.pt").exists()


def test_tables_columns_and_row_counts(sqlite_run):
    _, engine, _, _, (counts, _, _), _ = sqlite_run
    for name, columns in COLUMNS.items():
        assert {c["name"] for c in inspect(engine).get_columns(name)} == columns, name
    n = 3 * N_PER_LABEL
    with engine.connect() as conn:
        test_queries = {s.query for s in store.read_ranking_sets(conn, "test")}
        n_sets = sum(len(store.read_ranking_sets(conn, split)) for split in ("val", "test"))
    assert counts["ImageStore"] == n + 1 and counts["features"] == n  # broken.jpg listed, not featurized
    assert counts["training_images"] + counts["evaluation_images"] + counts["testing_images"] == n
    assert counts["query_images"] == n_sets * (1 + N_NEGATIVES)
    assert counts["model"] == 1 and counts["scores"] == n * len(LABEL_LOOKS)
    n_rankers = len(store.SCORE_RANKERS) + 1  # with the hybrid; the splits (val, test) x rankers x (top-Ns, mean, median, MRR, count)
    assert counts["evaluation_results"] == 2 * n_rankers * (len(TOP_NS) + 4)
    assert counts["ranking_results"] == n_rankers * len(test_queries) * K


def test_rerun_is_idempotent(sqlite_run):
    _, _, _, second, before, after = sqlite_run
    assert after == before  # same rows, none duplicated, same numbers
    assert second.stdout.strip().splitlines()[-1] == sqlite_run[2].stdout.strip().splitlines()[-1]


def test_evaluation_equals_evaluate_on_the_same_ranks(sqlite_run):
    _, engine, _, _, (_, stored, _), _ = sqlite_run
    with engine.connect() as conn:
        feats = store.read_features(conn)
        classifier = store.read_model(conn, feats.meta["model_id"])["ranker"]
        sets = {split: store.read_ranking_sets(conn, split) for split in ("val", "test")}
    assert feats.meta["model_id"] == "pretrained:efficientnet_lite0" and feats.matrix.shape == (30, 1280)
    for split in ("val", "test"):
        for name, metric in store.SCORE_RANKERS.items():
            expected = evaluation.evaluate(
                evaluation.rank_ranking_sets(classifier.set_params(metric=metric), feats, sets[split]), TOP_NS)
            assert {m: stored[(split, name, m)] for m in expected} == expected, (split, name)
    assert stored[("test", "classprob_cosine", "top1")] > 0.8  # three colours are easy


def test_splits_match_1_prepareData(sqlite_run):
    work, engine, _, _, _, _ = sqlite_run
    result = run_script("1_prepareData.py", *settings(work))
    assert result.returncode == 0, result.stderr
    proc = work / "proc" / "tiny"
    with engine.connect() as conn:
        for split in SPLITS:
            expected = load_split(proc / f"imgFilenames{split.title()}.json")
            assert store.read_split(conn, split) == {k: v for k, v in expected.items() if v}, split
        for split in ("val", "test"):
            expected = load_ranking_sets(proc / f"imgInfos{split.title()}.json")
            assert [(s.query, s.positive, s.references) for s in store.read_ranking_sets(conn, split)] == \
                [(s.query, s.positive, s.references) for s in expected]


def run_in_process(capsys, *argv):
    """The script's error paths in this process (no interpreter start-up): returns (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location("A3_sqlPipeline", REPO / "A3_sqlPipeline.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as info:
        helpers.run(script.main, script.__doc__, script.add_arguments, argv=list(argv))
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("db, message", [
    ("nonsense", "error: 'nonsense' is not a usable database URL"),
    ("sqlite:////no_such_dir_a3/x.sqlite", "error: cannot open the database sqlite:////no_such_dir_a3/x.sqlite"),
])
def test_bad_db_url_is_a_one_line_error(capsys, tmp_path, db, message):
    code, err = run_in_process(capsys, "--db", db, *settings(tmp_path))
    assert code == 2 and err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err


def test_step_without_its_inputs_is_a_one_line_error(capsys, tmp_path):
    code, err = run_in_process(capsys, "--steps", "5", *settings(tmp_path))
    assert code == 1 and err.strip() == "error: table scores is empty: run step 4 of A3_sqlPipeline.py first"


def test_postgresql_run_rerun_and_same_numbers_as_sqlite(sqlite_run):
    """Steps 2-6 on a real PostgreSQL server, twice, from step 1's rows copied out of the SQLite run."""
    work, sqlite_engine, _, _, (counts, results, ranking), _ = sqlite_run
    with sqlite_engine.connect() as conn:
        image_keys = list(conn.execute(select(store.image_store.c.path)).scalars())
        feats = store.read_features(conn)
    with running_postgres() as server:
        url = create_database(server, "a3_pipeline")
        engine = store.connect(url)
        try:
            store.write_image_store(engine, image_keys, feats.keys, feats.matrix, feats.meta["model_id"])
            steps = ["--db", url, "--steps", "2", "3", "4", "5", "6", *settings(work)]
            assert "Database: postgresql+psycopg2://postgres@127.0.0.1:" in run_ok(*steps).stdout
            once = snapshot(engine)
            run_ok(*steps)
            twice = snapshot(engine)
        finally:
            engine.dispose()
    assert once == twice  # re-run: no duplicated rows
    assert once[0] == counts and once[2] == ranking
    assert once[1] == pytest.approx(results, rel=1e-12, abs=0)
