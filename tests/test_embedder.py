"""The embedder: the one forward loop over files and in-memory images, skipped images, resolving a network."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLE_DIR, make_image
from image_similarity.models import backbones
from image_similarity.models.checkpoints import save_checkpoint
from image_similarity.models.embedder import Embedder, load_embedder, resolve_embedder
from image_similarity.models.heads import ImageClassifier
from image_similarity.models.inference import InferenceConfig
from image_similarity.data.images import SkippedImages, image_key, read_image


ON_TORCH = InferenceConfig(backend="torch")  # the loop is under test here; engines are test_engines.py's


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("efficientnet_lite0", ON_TORCH)


@pytest.fixture
def folder(tmp_path):
    """5 real photos (two labels) and 2 generated images, plus a corrupt file and an empty one."""
    root = tmp_path / "imgs"
    for label in ("can", "carton"):
        for src in sorted((SAMPLE_DIR / label).glob("*.jpg"))[:2]:
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / src.name).write_bytes(src.read_bytes())
    make_image(root / "gen" / "a.png", (200, 30, 30), pattern="stripes")
    make_image(root / "gen" / "b.jpg", (30, 40, 200), pattern="dots", size=(90, 60))
    (root / "gen" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "gen" / "empty.png").write_bytes(b"")
    return root


def _good(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("corrupt.jpg", "empty.png"))


def test_featurize_skips_and_names_bad_images(folder, embedder):
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    skipped = SkippedImages()
    keys, matrix = embedder.embed_files(paths, folder, batch_size=3, n_workers=2, skipped=skipped)
    assert keys == [image_key(p, folder) for p in _good(folder)]  # 8 files in, 6 vectors out, input order kept
    assert matrix.shape == (6, 1280) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert sorted(skipped.items) == [str(folder / "gen" / "corrupt.jpg"), str(folder / "gen" / "empty.png")]
    assert "empty" in skipped.items[str(folder / "gen" / "empty.png")]


def test_all_bad_batch_survives(folder, embedder):
    """With batches of 2, [corrupt, empty] is a batch with no readable image: it is skipped, not fatal."""
    paths = [folder / "gen" / "corrupt.jpg", folder / "gen" / "empty.png", folder / "gen" / "a.png"]
    skipped = SkippedImages()
    keys, matrix = embedder.embed_files(paths, folder, batch_size=2, n_workers=0, skipped=skipped)
    assert keys == ["gen/a.png"] and matrix.shape == (1, 1280) and len(skipped) == 2
    keys, matrix = embedder.embed_files(paths[:2], folder, batch_size=2, n_workers=0)
    assert keys == [] and matrix.shape == (0, 1280)


def test_batched_equals_unbatched_and_the_plain_forward(folder, embedder):
    paths = _good(folder)
    _, batched = embedder.embed_files(paths, folder, batch_size=4, n_workers=2)
    _, single = embedder.embed_files(paths, folder, batch_size=1, n_workers=0)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    with torch.inference_mode():
        plain = embedder.net(embedder.transform(read_image(paths[0]))[None])[0].numpy()
    np.testing.assert_allclose(batched[0], plain, atol=1e-4)


def test_features_are_deterministic(folder, embedder):
    paths = _good(folder)
    _, a = embedder.embed_files(paths, folder, batch_size=4, n_workers=0)
    _, b = embedder.embed_files(paths, folder, batch_size=4, n_workers=2)
    assert a.tobytes() == b.tobytes()


def test_embed_images_in_memory_gives_nan_rows_for_unusable_ones(folder, embedder):
    paths = _good(folder)[:2]
    pictures = [read_image(paths[0]), np.zeros((4, 4, 7), np.uint8), read_image(paths[1])]  # 7 channels: no image
    skipped = SkippedImages()
    rows = embedder.embed_images(pictures, batch_size=2, skipped=skipped, names=["a", "b", "c"])
    assert rows.shape == (3, 1280) and np.isnan(rows[1]).all() and list(skipped.items) == ["b"]
    _, from_files = embedder.embed_files(paths, folder, batch_size=2, n_workers=0)
    np.testing.assert_allclose(rows[[0, 2]], from_files, atol=1e-5)


def test_iterating_leaves_the_global_random_state_alone(folder, embedder):
    """Step 2 runs its validation pass between training epochs: it must not move dropout's random numbers."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    embedder.embed_files(_good(folder), folder, batch_size=2, n_workers=2)
    assert torch.equal(torch.rand(4), expected)


def test_forward_batch_is_the_one_seam(folder, embedder):
    """Replacing forward_batch (as an inference engine does) changes every output, files and images alike."""
    class Doubled(Embedder):
        def forward_batch(self, batch):
            return 2 * super().forward_batch(batch)

    doubled = Doubled(embedder.net, embedder.data_config, embedder.model_id, embedder.backbone)
    paths = _good(folder)[:2]
    _, plain = embedder.embed_files(paths, folder, batch_size=2, n_workers=0)
    _, twice = doubled.embed_files(paths, folder, batch_size=2, n_workers=0)
    np.testing.assert_allclose(twice, 2 * plain, rtol=1e-6)
    np.testing.assert_allclose(doubled.embed_images([Image.open(paths[0])]), 2 * plain[:1], rtol=1e-4, atol=1e-5)


def test_resolve_embedder_finds_the_network_or_refuses_in_one_message(tmp_path):
    found = resolve_embedder("pretrained:efficientnet_lite0", "efficientnet_lite0", tmp_path / "model.pt",
                             inference=ON_TORCH)
    assert found.model_id == "pretrained:efficientnet_lite0" and found.checkpoint is None
    model = ImageClassifier(backbones.create_model("efficientnet_lite0", pretrained=False), 2, 0.0)
    path = save_checkpoint(tmp_path / "model.pt", model, "efficientnet_lite0", ["a", "b"],
                           backbones.get_backbone("efficientnet_lite0").data_config(64))
    refined = resolve_embedder(backbones.model_id(path), "efficientnet_lite0", path, inference=ON_TORCH)
    assert refined.checkpoint == str(path) and refined.input_resolution == 64
    with pytest.raises(ValueError, match=r"f.npy holds features of sha256:0+, made by neither the pretrained "
                                         r"efficientnet_lite0 nor the refined network \(sha256:.*3_featurizeImages"):
        resolve_embedder("sha256:" + "0" * 16, "efficientnet_lite0", path, "f.npy")
    with pytest.raises(ValueError, match=r"missing \(.*absent.pt\)"):
        resolve_embedder("sha256:" + "0" * 16, "efficientnet_lite0", tmp_path / "absent.pt")
