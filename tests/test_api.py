"""The Turi-Create-like API: create, query, similarity_graph, add, save/load, summary, on real sample photos."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import image_similarity
from conftest import SAMPLE_DIR, make_image
from image_similarity.models import backbones
from image_similarity.models.checkpoints import save_checkpoint
from image_similarity.models.heads import ImageClassifier
from image_similarity.models.inference import InferenceConfig
from image_similarity.data.images import ImageReadError
from image_similarity.search.index import NearestNeighborIndex

LABELS = ("can", "carton", "milk_bottle", "water_bottle")
PER_LABEL = 6
README_EXAMPLE = """\
import image_similarity
model = image_similarity.create("data/fridgeObjects", label="folder")
print(model.query("data/fridgeObjects/can/can_1.jpg", k=3))
model.save("my_model")
print(image_similarity.load("my_model").similarity_graph(k=2).head())
"""


def _photos(label, start, stop):
    return sorted((SAMPLE_DIR / label).glob("*.jpg"))[start:stop]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 real photos, 6 per label, in <label>/ folders (the first 6 of each label of the sample, by name)."""
    root = tmp_path_factory.mktemp("refs") / "fridge"
    for label in LABELS:
        (root / label).mkdir(parents=True)
        for src in _photos(label, 0, PER_LABEL):
            shutil.copyfile(src, root / label / src.name)
    return root


# The API is under test here and the engines in test_engines.py: the module's long-lived models run PyTorch (with an
# OpenVINO engine in each, the whole suite's pytest process crashed with SIGSEGV in test_engines.py).
ON_TORCH = InferenceConfig(backend="torch")


@pytest.fixture(scope="module")
def model(folder):
    return image_similarity.create(folder, label="folder", n_workers=0, inference=ON_TORCH)


@pytest.fixture
def copy_of(model, tmp_path):
    """An independent model equal to ``model`` (through save/load), for tests that change it."""
    return image_similarity.load(model.save(tmp_path / "copy"), inference=ON_TORCH)


def test_import_is_light_and_names_are_public():
    code = "import sys, image_similarity; print(sorted(m for m in ('torch', 'faiss', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the public names are imported on first use, with torch
    assert {"create", "load", "SimilarityModel", "combine", "AttributeModel", "CombinedSimilarity"} <= set(
        dir(image_similarity))
    assert image_similarity.create.__module__ == "image_similarity.apps.similarity_model"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        image_similarity.nope  # noqa: B018


def test_readme_example_runs_as_written(folder, tmp_path, monkeypatch, capsys):
    """The README's five lines, run in a folder whose data/fridgeObjects holds the 24 test photos."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fridgeObjects").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    exec(compile(README_EXAMPLE, "README example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[1:] == ["data/fridgeObjects/can/can_1.jpg", "can/can_1.jpg", "0.000000", "1"]
    assert printed[4].split() == ["from", "to", "distance", "rank"] and len(printed) == 4 + 6
    assert (tmp_path / "my_model" / "model.json").is_file()


def test_reference_queried_finds_itself_first(model, folder):
    path = folder / "carton" / _photos("carton", 0, 1)[0].name
    result = model.query(path, k=4)
    assert list(result.columns) == ["query", "reference", "distance", "rank"]
    assert result["rank"].tolist() == [1, 2, 3, 4] and (result["query"] == str(path)).all()
    assert result["reference"].iloc[0] == f"carton/{path.name}" and result["distance"].iloc[0] < 1e-5
    assert result["distance"].is_monotonic_increasing and result["reference"].is_unique
    by_key = model.query(f"carton/{path.name}", k=4)  # a key is that reference's stored embedding
    assert by_key["reference"].tolist() == result["reference"].tolist()
    np.testing.assert_allclose(by_key["distance"], result["distance"], atol=1e-5)


def test_out_of_set_queries(model):
    outside = [_photos(label, PER_LABEL, PER_LABEL + 1)[0] for label in LABELS]
    result = model.query(outside, k=3)
    assert len(result) == 12 and result.groupby("query").size().tolist() == [3] * 4
    assert (result["distance"] > 1e-3).all()  # none of them is a reference
    firsts = result[result["rank"] == 1].set_index("query")["reference"]
    same_label = [firsts[str(p)].split("/")[0] == p.parent.name for p in outside]
    assert sum(same_label) >= 3  # pretrained Lite0 already finds the right object for most of them


def test_pil_and_array_queries_match_the_file(model, folder):
    path = folder / "can" / _photos("can", 2, 3)[0].name
    from_file = model.query(path, k=5)
    image = Image.open(path)
    for query in (image, np.asarray(image.convert("RGB"))):
        result = model.query(query, k=5)
        assert result["query"].unique().tolist() == ["0"]
        assert result["reference"].tolist() == from_file["reference"].tolist()
        np.testing.assert_allclose(result["distance"], from_file["distance"], atol=1e-4)
    stacked = np.stack([np.asarray(image.convert("RGB"))] * 2)  # (2, H, W, 3): two images
    assert model.query(stacked, k=2)["query"].tolist() == ["0", "0", "1", "1"]


def test_bad_queries(model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        model.query(broken)
    good = _photos("can", 0, 1)[0]
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = model.query([broken, good], k=2)
    assert result["query"].unique().tolist() == [str(good)]
    with pytest.raises(ValueError, match="k must be"):
        model.query(good, k=0)


def test_radius(model):
    key = f"milk_bottle/{_photos('milk_bottle', 0, 1)[0].name}"
    everything = model.query(key, k=len(model))
    assert len(everything) == len(model)
    radius = float(everything["distance"].iloc[3])
    near = model.query(key, k=len(model), radius=radius)
    assert near["distance"].max() <= radius and near["reference"].tolist() == everything["reference"].tolist()[:4]
    assert model.query(key, k=5, radius=1e-4)["reference"].tolist() == [key]


@pytest.mark.parametrize("k", [1, 3])
def test_similarity_graph(model, k):
    graph = model.similarity_graph(k=k)
    assert list(graph.columns) == ["from", "to", "distance", "rank"]
    assert len(graph) == k * len(model) and (graph.groupby("from").size() == k).all()
    assert not (graph["from"] == graph["to"]).any()
    assert (graph.groupby("from")["rank"].apply(list) == [list(range(1, k + 1))] * len(model)).all()
    with_self = model.similarity_graph(k=k, include_self_edges=True)
    firsts = with_self[with_self["rank"] == 1]
    assert len(with_self) == k * len(model) and (firsts["from"] == firsts["to"]).all()


def test_add_embeds_only_the_new_images(copy_of, tmp_path):
    before_keys, before = list(copy_of.keys), copy_of.features.copy()
    seen = []
    embedder, forward = copy_of.embedder, copy_of.embedder.forward_batch  # the one forward pass, on any engine
    embedder.forward_batch = lambda batch: seen.append(len(batch)) or forward(batch)
    new = [_photos("carton", PER_LABEL, PER_LABEL + 2)[i] for i in range(2)]
    copy_of.add(new, label=["carton", "carton"])
    copy_of.add(Image.open(_photos("can", PER_LABEL, PER_LABEL + 1)[0]), label=["can"])
    assert sum(seen) == 3  # three images went through the network, none of the 24 references
    assert copy_of.features[:len(before)].tobytes() == before.tobytes()
    assert copy_of.keys == before_keys + [str(p) for p in new] + [str(len(before_keys) + 2)]
    assert copy_of.summary()["labels"]["carton"] == PER_LABEL + 2 and len(copy_of) == 27
    found = copy_of.query(new[1], k=1)
    assert found["reference"].tolist() == [str(new[1])] and found["distance"].iloc[0] < 1e-5
    with pytest.raises(ValueError, match="already in use"):
        copy_of.add(new[:1], label=["carton"])
    with pytest.raises(ValueError, match="labelled"):
        copy_of.add(make_image(tmp_path / "x.png", (9, 9, 9)))


def test_save_load_gives_identical_results(model, folder, tmp_path):
    out = model.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["colours.json", "colours.npy", "features.json", "features.npy",
                                                   "index.faiss", "model.json"]
    loaded = image_similarity.load(out)
    queries = [folder / "can" / _photos("can", 0, 1)[0].name, _photos("water_bottle", PER_LABEL, PER_LABEL + 1)[0],
               "carton/" + _photos("carton", 1, 2)[0].name]
    pd.testing.assert_frame_equal(loaded.query(queries, k=6), model.query(queries, k=6))
    pd.testing.assert_frame_equal(loaded.similarity_graph(k=2), model.similarity_graph(k=2))
    assert loaded.summary() == model.summary() and loaded.labels == model.labels
    model.save(out)  # saving again over it is fine
    (out / "model.json").unlink()  # what an interrupted save leaves
    with pytest.raises(FileNotFoundError, match="model.json"):
        image_similarity.load(out)


def test_a_failed_save_leaves_the_earlier_one_loadable(model, copy_of, folder, tmp_path, monkeypatch):
    """A full disk half-way through a save over an earlier one: the earlier save still loads, nothing is left over."""
    out = model.save(tmp_path / "saved")
    before = image_similarity.load(out).query([folder / "can" / _photos("can", 0, 1)[0].name], k=5)

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(NearestNeighborIndex, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        copy_of.save(out)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(image_similarity.load(out).query([folder / "can" / _photos("can", 0, 1)[0].name],
                                                                   k=5), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "saved"]  # no half-written folder beside it


def test_save_refuses_a_folder_of_other_files(model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        model.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("field, value, word", [
    ("batch_size", 0, "'batch_size' must be an integer >= 1"), ("colour_weight", "abc", "'colour_weight' must be"),
    ("model", "/etc/passwd", "'model' must be 'model.pt' or a backbone name"), ("index_kind", "ball", "one of"),
    ("labels", {"a": 1}, "'labels' must be"), ("n_workers", True, "'n_workers' must be an integer >= 0"),
    ("batch_size", None, "'batch_size' is missing"), (None, None, "not a readable manifest")])
def test_load_checks_every_manifest_field(model, tmp_path, field, value, word):
    out = model.save(tmp_path / "saved")
    manifest = json.loads((out / "model.json").read_text())
    if field is None:
        (out / "model.json").write_text('{"format": ')  # truncated
    else:
        if value is None:
            del manifest[field]
        else:
            manifest[field] = value
        (out / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        image_similarity.load(out)
    assert str(out / "model.json") in str(err.value) and word in str(err.value)


def test_refined_checkpoint_is_copied_with_the_model(tmp_path):
    classifier = ImageClassifier(backbones.create_model("efficientnet_lite0"), 4)
    checkpoint = save_checkpoint(tmp_path / "model.pt", classifier, "efficientnet_lite0", LABELS,
                                 backbones.get_backbone("efficientnet_lite0").data_config())
    paths = [_photos(label, 0, 2)[i] for label in LABELS for i in range(2)]
    refined = image_similarity.create(paths, model=checkpoint, n_workers=0)
    assert refined.keys == [str(p) for p in paths] and refined.labels is None
    saved = refined.save(tmp_path / "saved")
    checkpoint.unlink()  # the saved model needs its own copy
    loaded = image_similarity.load(saved)
    assert loaded.summary()["model_id"] == backbones.model_id(saved / "model.pt") == refined.summary()["model_id"]
    pd.testing.assert_frame_equal(loaded.query(paths[:3], k=3), refined.query(paths[:3], k=3))
    manifest = json.loads((saved / "model.json").read_text())
    manifest["model_id"] = "sha256:0000000000000000"
    (saved / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="embedded with sha256:0000"):
        image_similarity.load(saved)


def test_summary_and_repr(model):
    summary = model.summary()
    assert summary == {"n_references": 24, "dim": 1280, "model": "efficientnet_lite0",
                       "model_id": "pretrained:efficientnet_lite0", "backbone": "efficientnet_lite0",
                       "index_kind": "exact", "labels": dict.fromkeys(LABELS, PER_LABEL)}
    assert repr(model) == ("SimilarityModel(24 references x 1280 dims, efficientnet_lite0 "
                           "(pretrained:efficientnet_lite0), exact index, 4 labels)")


def test_in_memory_references_labels_and_skipped_files(tmp_path):
    colours = {"red": (200, 30, 30), "blue": (30, 40, 200)}
    paths = [make_image(tmp_path / "imgs" / name / f"{i}.png", c, pattern="stripes")
             for name, c in colours.items() for i in range(2)]
    (tmp_path / "imgs" / "red" / "bad.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="bad.jpg"):
        from_folder = image_similarity.create(tmp_path / "imgs", label={"red/0.png": "r", "red/1.png": "r",
                                                                        "blue/0.png": "b", "blue/1.png": "b",
                                                                        "red/bad.jpg": "r"}, n_workers=0)
    assert from_folder.keys == ["blue/0.png", "blue/1.png", "red/0.png", "red/1.png"]
    assert from_folder.labels == ["b", "b", "r", "r"]
    pil = image_similarity.create([Image.open(p) for p in paths], label=["r", "r", "b", "b"], keys=list("abcd"),
                                  n_workers=0)
    assert pil.keys == list("abcd") and pil.query(paths[2], k=1)["reference"].tolist() == ["c"]
    with pytest.raises(ValueError, match="no label folder"):
        image_similarity.create([Image.open(paths[0])], label="folder")
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        image_similarity.create(paths, label=["r", "r", "b"])
    with pytest.raises(ValueError, match="unknown backbone|neither a backbone"):
        image_similarity.create(paths, model="no_such_net")


def test_adding_while_other_threads_query_is_safe():
    """add() in one thread while others query(): every call answers (it once raised about mismatched histograms)."""
    import threading

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(30)]
    shared = image_similarity.create(pictures[:6], n_workers=0, batch_size=4)
    errors, adding = [], threading.Event()
    adding.set()

    def add_one_by_one():
        for i in range(6, 30):
            try:
                shared.add([pictures[i]], keys=[f"new{i}"])
            except Exception as err:  # noqa: BLE001  (any failure is what this test looks for)
                errors.append(repr(err))
        adding.clear()

    def query_meanwhile():
        while adding.is_set():
            try:
                found = shared.query([pictures[1]], k=3)
                assert found["reference"].iloc[0] == "1"
            except Exception as err:  # noqa: BLE001
                errors.append(repr(err))

    threads = [threading.Thread(target=add_one_by_one), *(threading.Thread(target=query_meanwhile) for _ in range(2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [] and len(shared) == 30
