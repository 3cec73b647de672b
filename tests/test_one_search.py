"""One search core for every door: A1, the web service, the API opened on a run, the SQL variant and step 5's
per-query lists give the same top 10 with the same distances, for a learned, a fixed, the colour-joined and a
ranker registered here."""
import csv
import importlib.util

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import helpers
import image_similarity
from conftest import REPO, make_labelled_images, run_script
from image_similarity.apps import store
from image_similarity.apps.service import SimilarityService, create_app
from image_similarity.data.features import Features, load_features
from image_similarity.search import core, rankers

K = 10


class HalfL1Ranker(rankers.L1Ranker):
    """The toy ranker: half the Manhattan distance (a different scale, the same order as L1)."""

    def distances(self, queries, references):
        return 0.5 * super().distances(queries, references)


def settings(work):
    return ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "ratioValFromTrain=0.3", "--set", "run_nrWorkers=0",
            "--set", "svm_CValCandidates=[1.0]", "--set", "svm_classProbCValCandidates=[1.0, 10.0]",
            "--set", "eval_nrVisualizations=0", "--set", f"TOP_K_CANDIDATES={K}",
            *(arg for split in ("train", "val", "test") for arg in ("--set", f"{split}_maxNegImgsPerQueryImg=20"))]


def run_in_process(script, *argv):
    """A numbered script's ``main`` in this process (so that a ranker registered here exists there too)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    helpers.run(module.main, module.__doc__, module.add_arguments, argv=[str(a) for a in argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 labels x 12 images through steps 1, 3 (pretrained), 4 and the SQL variant's steps 1-3; the toy ranker
    registered (for this module only) through ``rankers.register_ranker``."""
    work = tmp_path_factory.mktemp("one_search")
    make_labelled_images(work / "data" / "tiny", 12)
    args = settings(work)
    for step in ("1_prepareData.py", "3_featurizeImages.py", "4_trainSvm.py"):
        result = run_script(step, *args)
        assert result.returncode == 0, f"{step}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    result = run_script("A3_sqlPipeline.py", "--steps", "1", "2", "3", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    P = helpers.load_parameters([a for a in args if a != "--set"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rankers, "_REGISTRY", dict(rankers._REGISTRY))  # the toy leaves with this module
        rankers.register_ranker("halfL1", lambda svm, classprob, random_state: HalfL1Ranker())
        service = SimilarityService.from_run(helpers.load_run(P), P.imgDir)
        model = image_similarity.open_run(P.procDir, backbone=P.rf_backbone, image_dir=P.imgDir,
                                          inference=helpers.inference_config(P))
        yield work, args, P, TestClient(create_app(service)), model


def step_5(run, ranker):
    """Step 5's ranking_results.csv for ``ranker``: {query: [(candidate, distance), ...]}."""
    work, args, P, _, _ = run
    run_in_process("5_evaluate.py", "--ranker", ranker, *args)
    with open(P.rankingResultsPath, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    found = {}
    for row in rows:
        found.setdefault(row["query"], []).append((row["candidate"], float(row["distance"])))
    return found


def a1(run, query, ranker):
    work, args, P, _, _ = run
    run_in_process("A1_imageRetrieval.py", P.imgDir / query, "--top", K + 1, "--ranker", ranker, *args)
    stem = query.rsplit("/", 1)[1].rsplit(".", 1)[0]
    with open(P.layout.retrieval_figure(stem, ranker).with_suffix(".csv"), encoding="utf-8", newline="") as handle:
        return [(row["key"], float(row["distance"])) for row in csv.DictReader(handle)]


def service(run, query, ranker):
    _, _, P, client, _ = run
    response = client.post("/query", files={"image": ("q.jpg", (P.imgDir / query).read_bytes(), "image/jpeg")},
                           data={"k": str(K + 1), "ranker": ranker})
    assert response.status_code == 200, response.text
    assert response.json()["ranker"] == ranker
    return [(m["key"], m["distance"]) for m in response.json()["results"]]


def api(run, query, ranker):
    _, _, P, _, model = run
    frame = model.query(str(P.imgDir / query), k=K + 1, ranker=ranker)
    return list(zip(frame["reference"], frame["distance"]))


def sql(run, ranker):
    work, args, P, _, _ = run
    run_in_process("A3_sqlPipeline.py", "--steps", "6", "--rankers", ranker, *args)
    engine = store.connect(f"sqlite:///{P.sqlDbPath}")
    with engine.connect() as conn:
        paths = dict(conn.execute(select(store.image_store.c.id, store.image_store.c.path)).all())
        rows = conn.execute(select(store.ranking_results).where(store.ranking_results.c.ranker == ranker)
                            .order_by(store.ranking_results.c.query_id, store.ranking_results.c.rank)).all()
    engine.dispose()
    found = {}
    for row in rows:
        found.setdefault(paths[row.query_id], []).append((paths[row.candidate_id], row.distance))
    return found


def assert_same(expected, got, door):
    assert [key for key, _ in got] == [key for key, _ in expected], door
    np.testing.assert_allclose([d for _, d in got], [d for _, d in expected], atol=1e-6, rtol=0, err_msg=door)


def without(query, matches):
    """A door that embeds the query image finds the image itself too; the pipeline leaves it out."""
    assert len(matches) == K + 1
    return [(key, distance) for key, distance in matches if key != query][:K]


@pytest.mark.parametrize("ranker", ["hybrid", "classprob_same", "cosine", "cosine+colour", "halfL1"])
def test_every_door_gives_the_same_top_10(run, ranker):
    lists = step_5(run, ranker)
    query = sorted(lists)[0]
    expected = lists[query]
    assert len(expected) == K
    for door, found in (("A1", a1(run, query, ranker)), ("service", service(run, query, ranker)),
                        ("API", api(run, query, ranker))):
        assert_same(expected, without(query, found), door)
    if ranker != "cosine+colour":  # the SQL variant has no image folder for colour histograms
        assert_same(expected, sql(run, ranker)[query], "SQL")


def test_the_core_excludes_the_query_and_breaks_ties_by_row(tmp_path):
    matrix = np.array([[0, 0], [1, 0], [3, 0], [0, 2]], np.float32)
    gallery = core.Gallery(["x/a.jpg", "x/b.jpg", "y/c.jpg", "y/d.jpg"], matrix, "toy")

    class Euclidean:
        def distances(self, queries, references):
            return np.linalg.norm(queries[:, None, :] - references[None, :, :], axis=-1)

    found = core.search_keys(gallery, Euclidean(), ["x/b.jpg", "y/d.jpg"], 2)
    assert found.matches(0) == [("x/a.jpg", 1.0), ("y/c.jpg", 2.0)]
    assert found.matches(1) == [("x/a.jpg", 2.0), ("x/b.jpg", pytest.approx(5 ** 0.5))]
    # Blocks of one gallery row at a time give the same answer; ties keep the lower row first.
    tied = core.search(gallery, Euclidean(), np.array([[1, 1]], np.float32), 4, block_bytes=8)
    assert [key for key, _ in tied.matches(0)] == ["x/b.jpg", "x/a.jpg", "y/d.jpg", "y/c.jpg"]
    assert core.search(gallery, Euclidean(), matrix[:1], 9).indices.shape == (1, 4)  # k capped at the gallery
    with pytest.raises(ValueError, match="k must be a positive integer"):
        core.search(gallery, Euclidean(), matrix[:1], 0)


def test_ranker_names_are_resolved_in_one_place():
    available = rankers.build_rankers()
    assert isinstance(core.resolve_ranker("cosine+colour", available), rankers.ColourCosineRanker)
    with pytest.raises(ValueError, match=r"unknown ranker 'nope': choose from random, L1, L2, cosine, "
                                         r"cosine\+colour, weightedl2"):
        core.resolve_ranker("nope", available)
    with pytest.raises(ValueError, match="'hybrid' needs step 4's svm and classifier payloads"):
        core.resolve_ranker("hybrid", available)
    with pytest.raises(ValueError, match="already registered"):
        rankers.register_ranker("cosine", lambda svm, classprob, random_state: rankers.CosineRanker())


def test_colour_histograms_are_cached_beside_the_features(run):
    _, _, P, _, _ = run
    stored = load_features(P.featuresPath)
    cache = core.colour_cache_path(P.featuresPath)
    cache.unlink(missing_ok=True)
    histograms = core.run_gallery(stored, P.featuresPath, P.imgDir, helpers.load_run(P).load_network) \
        .colour_histograms()
    assert cache.name == "features.colours.npy"
    cached = load_features(cache, mmap=False)
    np.testing.assert_array_equal(cached.matrix, histograms)
    assert cached.keys == stored.keys and cached.matrix.shape == (len(stored), 64)
    np.testing.assert_allclose(np.linalg.norm(cached.matrix, axis=1), 1, atol=1e-5)
    gallery = core.Gallery.from_features(Features(stored.keys, stored.matrix, stored.meta))
    with pytest.raises(ValueError, match="needs the colour histograms of the gallery"):
        core.search_keys(gallery, rankers.ColourCosineRanker(), stored.keys[:1], 3)


def test_search_gives_what_each_ranker_gave_before(run):
    """Every ranker of the run: the core's top 10 (index or blocks) is the stable sort of the ranker's own distances."""
    _, _, P, _, _ = run
    loaded = helpers.load_run(P, network=False, attributes=False)
    gallery = core.run_gallery(loaded.features, P.featuresPath, P.imgDir, loaded.load_network)
    rows = gallery.rows(gallery.keys[::5])
    for name, ranker in loaded.rankers.items():
        if name == "random":
            continue  # new numbers on every call
        inputs = gallery.inputs(ranker)
        for block_bytes in (core.BLOCK_BYTES, 8):  # the whole gallery at once, and one row at a time
            found = core.search(gallery, ranker, np.asarray(gallery.matrix[rows]), K,
                                gallery.colour_histograms()[rows], exclude=rows, block_bytes=block_bytes)
            everything = ranker.distances(inputs[rows], inputs)
            for i, row in enumerate(rows):
                everything[i, row] = np.inf
                order = np.argsort(everything[i], kind="stable")[:K]
                assert [key for key, _ in found.matches(i)] == [gallery.keys[j] for j in order], name
                np.testing.assert_allclose([d for _, d in found.matches(i)], everything[i, order], atol=1e-6,
                                           rtol=0, err_msg=name)
