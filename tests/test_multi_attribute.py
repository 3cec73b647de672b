"""Multi-attribute similarity: per-attribute calibrated probabilities, combined by weighted mean."""
import copy
import shutil

import numpy as np
import pytest

import image_similarity
from conftest import SAMPLE_DIR
from image_similarity.pipeline import evaluation, training
from image_similarity.data import features
from image_similarity.search import ranker_files, rankers
from image_similarity.apps.attributes import AttributeModel, combine
from image_similarity.data.splits import make_ranking_sets

N_LABELS, BLOCK, DIM = 4, 8, 24


def _sample(rng, a, b):
    """Embeddings where attribute A lives in dims 0-7 and attribute B in dims 8-15 (label i: dim i of its block)."""
    x = rng.normal(0.0, 0.2, (len(a), DIM))
    x[np.arange(len(a)), a] += 2.0
    x[np.arange(len(b)), BLOCK + np.asarray(b)] += 2.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, N_LABELS, 200), rng.integers(0, N_LABELS, 200)
    x = _sample(rng, a, b)
    attribute_a = AttributeModel.fit(x, a, name="A")
    attribute_b = AttributeModel.fit(x, b, name="B")
    queries = _sample(rng, np.zeros(40, int), np.zeros(40, int))  # A = 0, B = 0, none of them in the training set
    # four references: matching on both attributes, on A only, on B only, on none
    references = _sample(rng, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    held_out = (rng.integers(0, N_LABELS, 100), rng.integers(0, N_LABELS, 100))
    return attribute_a, attribute_b, queries, references, (_sample(rng, *held_out), held_out[1])


BOTH, A_ONLY, B_ONLY, NONE = range(4)


def test_matching_on_both_attributes_ranks_first(synthetic):
    attribute_a, attribute_b, queries, references, _ = synthetic
    combined = combine([attribute_a, attribute_b])
    p = combined.probabilities(queries, references)
    assert p.shape == (40, 4) and ((0 <= p) & (p <= 1)).all()
    assert (p[:, BOTH] > p[:, [A_ONLY, B_ONLY]].max(axis=1)).all()
    assert (p[:, [A_ONLY, B_ONLY]].min(axis=1) > p[:, NONE]).all()
    per = combined.attribute_probabilities(queries, references)
    np.testing.assert_allclose(p, per.mean(axis=0))  # equal weights: the plain mean of the two probabilities
    assert (per[0][:, A_ONLY] > 0.8).all() and (per[1][:, A_ONLY] < 0.2).all()  # each attribute sees its own dims
    np.testing.assert_allclose(combined.distances(queries, references), 1 - p)


def test_probabilities_not_raw_scores_are_averaged(synthetic):
    """Multiply B's SVM scores by 1000 and recalibrate: the combination does not move, a raw-score mean would."""
    attribute_a, attribute_b, queries, references, (held_x, held_b) = synthetic
    i, j = np.triu_indices(len(held_x), 1)
    diffs, same = training.pair_differences(held_x[i], held_x[j]), held_b[i] == held_b[j]
    svm = attribute_b.ranker.ranker
    loud = copy.deepcopy(svm)
    for owner in (loud, loud.svm_):
        owner.coef_, owner.intercept_ = owner.coef_ * 1000, owner.intercept_ * 1000
    np.testing.assert_allclose(loud.scores(queries, references), 1000 * svm.scores(queries, references))
    quiet_b = AttributeModel(rankers.CalibratedRanker(svm, 5.0).fit(diffs, same), "B")
    loud_b = AttributeModel(rankers.CalibratedRanker(loud, 5.0).fit(diffs, same), "B")
    quiet = combine([attribute_a, quiet_b]).probabilities(queries, references)
    loud_p = combine([attribute_a, loud_b]).probabilities(queries, references)
    np.testing.assert_allclose(loud_p, quiet, atol=1e-6)
    assert (np.argsort(-loud_p, axis=1) == np.argsort(-quiet, axis=1)).all()
    assert (loud_p[:, BOTH] > loud_p[:, B_ONLY]).all()
    # Averaging raw scores instead, B's scale drowns A: B-only always beats A-only, and "both" is no longer first.
    raw = (attribute_a.ranker.ranker.scores(queries, references) + loud.scores(queries, references)) / 2
    assert (raw[:, B_ONLY] > raw[:, A_ONLY]).all()
    assert not (raw[:, BOTH] > raw[:, B_ONLY]).all()


def test_weights_change_the_order(synthetic):
    attribute_a, attribute_b, queries, references, _ = synthetic
    mostly_a = combine([attribute_a, attribute_b], weights=[9, 1]).probabilities(queries, references)
    mostly_b = combine([attribute_a, attribute_b], weights=[0.1, 0.9]).probabilities(queries, references)
    assert (mostly_a[:, A_ONLY] > mostly_a[:, B_ONLY]).all()
    assert (mostly_b[:, B_ONLY] > mostly_b[:, A_ONLY]).all()
    only_a = combine([attribute_a, attribute_b], weights=[1, 0]).probabilities(queries, references)
    np.testing.assert_allclose(only_a, attribute_a.probabilities(queries, references))
    for bad in ([1], [1, -1], [0, 0]):
        with pytest.raises(ValueError, match="weights must be 2 non-negative"):
            combine([attribute_a, attribute_b], weights=bad)
    with pytest.raises(ValueError, match="distinct names"):
        combine([attribute_a, attribute_a])


def test_class_probability_attribute(synthetic):
    attribute_a, _, queries, references, _ = synthetic
    rng = np.random.default_rng(1)
    a = rng.integers(0, N_LABELS, 120)
    classprob = AttributeModel.fit(_sample(rng, a, rng.integers(0, N_LABELS, 120)), a, name="A", kind="classprob")
    p = classprob.probabilities(queries, references)
    assert p.shape == (40, 4) and (p[:, [BOTH, A_ONLY]].min(axis=1) > p[:, [B_ONLY, NONE]].max(axis=1)).all()
    with pytest.raises(ValueError, match="kind must be"):
        AttributeModel.fit(queries, np.zeros(40), kind="svm")


def test_too_few_images_per_label_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="calibration part"):
        AttributeModel.fit(x, [0, 0, 0, 1, 1, 1], name="tiny")


def test_from_pipeline_payload(synthetic, tmp_path):
    """The payload 4_trainSvm.py writes, next to the features it was trained on; another model's is refused."""
    attribute_a = synthetic[0]
    proc = tmp_path / "proc" / "fridge"
    features.save_features(proc / "features.npy", ["a/1.jpg"], np.zeros((1, DIM), np.float32),
                           {"model_id": "pretrained:efficientnet_lite0", "backbone": "efficientnet_lite0"})
    ranker_files.save_payload(proc / "svm.skops", "pretrained:efficientnet_lite0", ranker=attribute_a.ranker.ranker,
                         calibrated=attribute_a.ranker)
    loaded = AttributeModel.from_pipeline(proc / "svm.skops")
    assert loaded.name == "fridge" and loaded.model_id == "pretrained:efficientnet_lite0"
    x = synthetic[2]
    np.testing.assert_allclose(loaded.probabilities(x, x), attribute_a.probabilities(x, x))
    ranker_files.save_payload(proc / "other.skops", "sha256:0123456789abcdef", ranker=attribute_a.ranker.ranker,
                         calibrated=attribute_a.ranker)
    with pytest.raises(ValueError, match="another model|trained on features of sha256"):
        AttributeModel.from_pipeline(proc / "other.skops")
    with pytest.raises(FileNotFoundError, match="features.json"):
        AttributeModel.from_pipeline(tmp_path / "svm.skops")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 real photos, 10 per label, and a similarity model over them labelled by object."""
    root = tmp_path_factory.mktemp("photos")
    for label in ("can", "carton", "milk_bottle", "water_bottle"):
        (root / label).mkdir()
        for src in sorted((SAMPLE_DIR / label).glob("*.jpg"))[:10]:
            shutil.copyfile(src, root / label / src.name)
    return image_similarity.create(root, label="folder", n_workers=0)


def test_two_labelings_of_real_photos(photos):
    """Object (the folder) and container kind (bottle or not): combined query over a SimilarityModel."""
    kind = ["bottle" if "bottle" in label else "box_or_can" for label in photos.labels]
    obj = image_similarity.AttributeModel.fit(photos, name="object")
    container = image_similarity.AttributeModel.fit(photos, kind, name="kind")
    assert obj.model_id == container.model_id == "pretrained:efficientnet_lite0"
    both = image_similarity.combine([obj, container], weights=[2, 1], model=photos)
    query = next(k for k in photos.keys if k.startswith("milk_bottle/"))
    result = both.query([query], k=5)
    assert list(result.columns) == ["query", "reference", "probability", "rank", "probability_object",
                                    "probability_kind"]
    assert result["rank"].tolist() == [1, 2, 3, 4, 5] and result["probability"].is_monotonic_decreasing
    np.testing.assert_allclose(result["probability"],
                               (2 * result["probability_object"] + result["probability_kind"]) / 3)
    assert result["reference"].iloc[0] == query  # itself: it matches on both attributes
    assert result["reference"].str.contains("bottle").sum() >= 4
    # the combined similarity is a ranker like the others: score it on ranking sets of the object labels
    by_label = {}
    for key, label in zip(photos.keys, photos.labels):
        by_label.setdefault(label, []).append(key)
    sets = make_ranking_sets(by_label, 3, 10, 0)
    store = features.Features(photos.keys, photos.features, {})
    ranks = evaluation.rank_ranking_sets(both, store, sets)
    assert len(ranks) == 12 and evaluation.mean_rank(ranks) < 3.0  # chance would be 6
    with pytest.raises(ValueError, match="different networks"):
        combine([obj, AttributeModel(container.ranker, "other", "sha256:0123456789abcdef")])
