"""NearestNeighborIndex on small clustered random data: exactness, recall, radius, add, save/load, memmap, errors."""
import numpy as np
import pytest

from image_similarity.data.fileio import save_npy
from image_similarity.search.index import NearestNeighborIndex, recall_at_k

N, DIM, N_CLUSTERS = 5000, 64, 50


def clustered(n, seed, dim=DIM):
    """``(n, dim)`` float32 vectors around 50 fixed centroids (not normalised: the index must do it)."""
    centroids = np.random.default_rng(12345).standard_normal((N_CLUSTERS, dim))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLUSTERS, n)
    return (3 * centroids[labels] + rng.standard_normal((n, dim))).astype(np.float32)


def brute_force(references, queries, k):
    """Cosine distances and rows of the k nearest, by a full sort."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distances = 1 - unit(queries.astype(np.float64)) @ unit(references.astype(np.float64)).T
    rows = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, rows, axis=1), rows


@pytest.fixture(scope="module")
def references():
    return clustered(N, seed=0)


@pytest.fixture(scope="module")
def queries():
    return clustered(200, seed=1)


@pytest.fixture(scope="module")
def ivf(references):
    return NearestNeighborIndex("ivf").build(references)


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_exact_search_equals_brute_force(references, queries, backend):
    index = NearestNeighborIndex("exact", exact_backend=backend, batch_size=64).build(references)
    distances, rows = index.search(queries, 10)
    expected_distances, expected_rows = brute_force(references, queries, 10)
    assert distances.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (200, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-5)
    assert len(index) == N and index.built_kind == "exact"


def test_auto_picks_exact_below_threshold_and_ivf_above(references):
    assert NearestNeighborIndex().build(references).built_kind == "exact"
    assert NearestNeighborIndex(ann_threshold=N).build(references).built_kind == "ivf"


def test_ivf_recall_at_default_setting(ivf, references, queries):
    _, truth = brute_force(references, queries, 10)
    assert ivf.n_lists == N // 39 and ivf.search_width >= 1
    assert recall_at_k(ivf.search(queries, 10)[1], truth) >= 0.9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_calibrate_recall_reaches_target(references, queries, kind):
    index = NearestNeighborIndex(kind).build(references)
    index.search_width = 1
    low = recall_at_k(index.search(queries, 10)[1], brute_force(references, queries, 10)[1])
    held_out = clustered(200, seed=2)
    measured = index.calibrate_recall(held_out, target=0.95)
    recall = recall_at_k(index.search(queries, 10)[1], brute_force(references, queries, 10)[1])
    assert low < 0.95 <= measured and index.search_width > 1
    assert recall >= 0.93


def test_radius_keeps_only_neighbours_within_it(references, queries):
    index = NearestNeighborIndex("exact").build(references)
    distances, rows = index.search(queries, 10)
    radius = float(np.median(distances))
    within_d, within_r = index.search(queries, 10, radius=radius)
    inside = distances <= radius
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(within_r[inside], rows[inside])
    assert (within_r[~inside] == -1).all() and np.isinf(within_d[~inside]).all()


def test_range_search_returns_every_reference_within_the_radius(references, queries):
    index = NearestNeighborIndex("exact", batch_size=64).build(references)
    truth, _ = brute_force(references, queries, N)
    radius = float(np.quantile(truth[:, 0], 0.5)) + 0.02
    lims, distances, rows = index.range_search(queries, radius)
    assert lims.shape == (len(queries) + 1,) and lims[-1] == len(rows) == len(distances)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    exact = 1 - unit(queries.astype(np.float64)) @ unit(references.astype(np.float64)).T
    for i in range(len(queries)):
        expected = set(np.flatnonzero(exact[i] <= radius - 1e-5))
        found = set(rows[lims[i]:lims[i + 1]].tolist())
        assert expected <= found <= set(np.flatnonzero(exact[i] <= radius + 1e-5))
    assert 0 < lims[-1] and (distances <= radius).all()
    np.testing.assert_allclose(distances, exact[np.repeat(np.arange(len(queries)), np.diff(lims)), rows], atol=1e-5)
    with pytest.raises(ValueError, match="radius"):
        index.range_search(queries, 2.5)


def test_add_finds_new_vectors_and_matches_rebuild(references, queries):
    for kind in ("exact", "ivf"):
        index = NearestNeighborIndex(kind).build(references[:4000])
        index.add(references[4000:])
        assert len(index) == N
        _, rows = index.search(references[4000:4100], 1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(4000, 4100))
        rebuilt = NearestNeighborIndex("exact").build(references)
        if kind == "exact":
            np.testing.assert_array_equal(index.search(queries, 10)[1], rebuilt.search(queries, 10)[1])
        else:
            assert recall_at_k(index.search(queries, 10)[1], rebuilt.search(queries, 10)[1]) >= 0.9


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(references, queries, kind, tmp_path):
    index = NearestNeighborIndex(kind).build(references)
    if kind != "exact":
        index.search_width = 3
    path = index.save(tmp_path / "index.faiss")
    loaded = NearestNeighborIndex.load(path)
    assert loaded.built_kind == kind and len(loaded) == N and loaded.search_width == index.search_width
    for before, after in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(before, after)
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_memmap_input_gives_same_results(references, queries, tmp_path):
    path = save_npy(tmp_path / "features.npy", references)
    from_disk = NearestNeighborIndex("exact").build(np.load(path, mmap_mode="r"))
    in_memory = NearestNeighborIndex("exact").build(references)
    for a, b in zip(from_disk.search(queries, 5), in_memory.search(queries, 5)):
        np.testing.assert_array_equal(a, b)


def test_k_larger_than_the_index_is_capped(references):
    index = NearestNeighborIndex("exact").build(references[:7])
    distances, rows = index.search(references[:2], 50)
    assert rows.shape == (2, 7) and sorted(rows[0]) == list(range(7))
    assert rows[0, 0] == 0 and distances[0, 0] == pytest.approx(0, abs=1e-6)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_wrong_dims_name_the_expected_shape(references):
    index = NearestNeighborIndex("exact").build(references)
    with pytest.raises(ValueError, match=r"queries must have shape \(n_queries, 64\), got \(3, 32\)"):
        index.search(np.zeros((3, 32), np.float32), 5)
    with pytest.raises(ValueError, match=r"vectors must have shape \(n, 64\), got \(32,\)"):
        index.add(np.zeros(32, np.float32))
    with pytest.raises(ValueError, match=r"features must have shape \(n_vectors, n_dims\)"):
        NearestNeighborIndex().build(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="kind must be one of"):
        NearestNeighborIndex("lsh").build(references)
    with pytest.raises(ValueError, match="NaN"):
        NearestNeighborIndex().build(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="call build"):
        NearestNeighborIndex().search(references[:1], 1)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        NearestNeighborIndex.load(tmp_path / "missing.faiss")
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not an index")
    with pytest.raises(ValueError, match="junk.faiss: not a FAISS index"):
        NearestNeighborIndex.load(junk)
