"""The CPU inference engines: parity with PyTorch on real photos, the export cache, and the fallbacks."""
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from image_similarity.models import backbones, engines
from image_similarity.models.embedder import Embedder
from image_similarity.models.inference import InferenceConfig, set_thread_count
from image_similarity.data.fileio import load_json
from image_similarity.data.images import list_images, read_image

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

RESOLUTION = 320  # a refined network's input size (rf_inputResolution; 320 was its default)


def _min_cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


MODEL_ID = "pretrained:efficientnet_lite0"
LITE0 = backbones.get_backbone("efficientnet_lite0").data_config(RESOLUTION)
SMALL = backbones.get_backbone("resnet18").data_config(32)  # the small test network's inputs: 32 px


def on(backend, precision="f32", device=None):
    return InferenceConfig(backend=backend, precision=precision, device=device)


@pytest.fixture(scope="module")
def lite0(sample_dir, tmp_path_factory):
    """Pretrained Lite0, 8 real photos at 320 px, PyTorch's features of them, and one ONNX export for the module."""
    net = backbones.create_model("efficientnet_lite0")
    transform = LITE0.eval_transform()
    photos = list_images(sample_dir)[::17][:8]
    batch = torch.stack([transform(read_image(p)) for p in photos])
    with torch.inference_mode():
        expected = net(batch).numpy()
    path = engines.export_path_for(MODEL_ID, RESOLUTION, cache_dir=tmp_path_factory.mktemp("cache"))
    engines.export_onnx(net, path, MODEL_ID, LITE0)
    return net, batch, expected, path


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_f32_engines_match_pytorch_on_real_photos(lite0, backend):
    net, batch, expected, path = lite0
    before = path.stat().st_mtime_ns
    engine = engines.load_engine(net, MODEL_ID, LITE0, path, on(backend), streams=2)
    assert (engine.name, engine.precision) == (backend, "f32")
    assert path.stat().st_mtime_ns == before  # the valid export was reused, not rebuilt
    out = engine(batch)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert _min_cosine(out, expected) >= 0.99999
    assert _min_cosine(engine(batch[:1]), expected[:1]) >= 0.99999  # any batch size


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_streams_run_concurrent_calls_without_mixing_them(lite0, backend):
    """Calls from several threads at once (the service) share the streams and each gets its own rows back."""
    net, batch, expected, path = lite0
    engine = engines.load_engine(net, MODEL_ID, LITE0, path, on(backend), streams=2)
    assert engine.streams == 2
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: engine(batch[i % len(batch)][None]), range(3 * len(batch))))
    for i, out in enumerate(outs):
        assert _min_cosine(out, expected[i % len(batch)][None]) >= 0.99999


FIRST_CALLS_AT_ONCE = """
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from image_similarity.models import backbones, engines
from image_similarity.models.inference import InferenceConfig
net = backbones.create_model("efficientnet_lite0")
data_config = backbones.get_backbone("efficientnet_lite0").data_config(int(sys.argv[2]))
engine = engines.load_engine(net, sys.argv[1], data_config, sys.argv[3], InferenceConfig(sys.argv[4]), streams=2)
with ThreadPoolExecutor(4) as pool:
    outs = list(pool.map(engine, [np.zeros((1, 3, int(sys.argv[2]), int(sys.argv[2])), np.float32)] * 8))
print(engine.name, engine.streams, len(outs))
"""


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_the_first_calls_of_a_fresh_process_may_come_from_several_threads(lite0, backend):
    """The service's first queries arrive together: in a new process they must not deadlock the engine."""
    path = lite0[3]
    done = subprocess.run([sys.executable, "-c", FIRST_CALLS_AT_ONCE, MODEL_ID, str(RESOLUTION), str(path), backend],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [backend, "2", "8"]


def test_one_stream_when_the_config_gives_one_thread(lite0):
    """A Ray actor runs with threads=1: torch then uses one thread, and its engine one stream, on one core."""
    net, batch, expected, path = lite0
    embedder = Embedder(net, LITE0, MODEL_ID, "efficientnet_lite0", device="cpu")
    before = torch.get_num_threads()
    try:
        embedder.use_engine(InferenceConfig("openvino", threads=1), cache_dir=path.parent)
        assert torch.get_num_threads() == 1
    finally:
        set_thread_count(before)
    assert embedder.engine.streams == 1 and _min_cosine(embedder.engine(batch), expected) >= 0.99999


def test_the_embedder_runs_on_the_engine_end_to_end(lite0, sample_dir):
    """Files in, features out through Embedder.embed_files: the engine gives PyTorch's features."""
    net, _, _, path = lite0
    photos = list_images(sample_dir)[::9][:16]
    embedder = Embedder(net, LITE0, MODEL_ID, "efficientnet_lite0", device="cpu")
    keys, expected = embedder.embed_files(photos, sample_dir, batch_size=8, n_workers=0)
    embedder.use_engine(InferenceConfig(), cache_dir=path.parent)
    assert embedder.runs_on == "openvino f32" and embedder.engine.path == path
    engine_keys, rows = embedder.embed_files(photos, sample_dir, batch_size=8, n_workers=0)
    assert engine_keys == keys and _min_cosine(rows, expected) >= 0.99999
    assert embedder.use_engine(on("torch")).engine is None


def test_bf16_only_where_the_cpu_has_it(lite0, caplog):
    net, batch, expected, path = lite0
    with caplog.at_level(logging.WARNING, logger="image_similarity.models.engines"):
        engine = engines.load_engine(net, MODEL_ID, LITE0, path, on("auto", "bf16"))
    if engines.native_bf16():
        assert (engine.name, engine.precision) == ("openvino", "bf16")
        assert _min_cosine(engine(batch), expected) >= 0.99  # bf16 keeps 8 bits of mantissa
    else:
        assert engine.precision == "f32" and "no native bf16" in caplog.text


def test_bf16_and_unknown_settings_are_refused_when_the_config_is_built():
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(ValueError, match="OpenVINO only"):
            InferenceConfig(backend, "bf16")
    with pytest.raises(ValueError, match="run_backend='tensorrt'"):
        InferenceConfig("tensorrt")
    with pytest.raises(ValueError, match="run_precision='f16'"):
        InferenceConfig("auto", "f16")
    with pytest.raises(ValueError, match="threads=0"):
        InferenceConfig(threads=0)


def test_auto_on_cuda_and_torch_keep_pytorch(lite0):
    net, _, _, path = lite0
    assert engines.load_engine(net, MODEL_ID, LITE0, path, on("torch")) is None
    assert engines.load_engine(net, MODEL_ID, LITE0, path, on("auto", device="cuda")) is None


# ---------------------------------------------------------------- the export cache, on a small network

def _small_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()


def _save(net, path):
    torch.save(net.state_dict(), path)
    return backbones.model_id(path)


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 32, 32)


def _torch_out(net, pixels):
    with torch.inference_mode():
        return net(pixels).numpy()


def test_export_is_reused_then_rebuilt_when_the_model_changes(tmp_path, pixels, caplog):
    checkpoint = tmp_path / "model.pt"
    first = _small_net(0)
    export = engines.export_path_for(_save(first, checkpoint), 32, checkpoint)
    assert export == tmp_path / "model.onnx"
    assert engines.export_path_for("pretrained:x", 32, cache_dir=tmp_path) == tmp_path / "pretrained-x-32px.onnx"
    engine = engines.load_engine(first, backbones.model_id(checkpoint), SMALL, export, on("onnxruntime"))
    np.testing.assert_allclose(engine(pixels), _torch_out(first, pixels), atol=1e-5)
    written = export.stat().st_mtime_ns
    engines.load_engine(first, backbones.model_id(checkpoint), SMALL, export, on("onnxruntime"))
    assert export.stat().st_mtime_ns == written  # same model: the export is reused

    second = _small_net(1)  # the checkpoint is retrained: another model_id
    with caplog.at_level(logging.INFO, logger="image_similarity.models.engines"):
        engine = engines.load_engine(second, _save(second, checkpoint), SMALL, export, on("onnxruntime"))
    assert "exported from sha256:" in caplog.text
    np.testing.assert_allclose(engine(pixels), _torch_out(second, pixels), atol=1e-5)
    assert np.abs(_torch_out(first, pixels) - _torch_out(second, pixels)).max() > 1e-2


def test_the_sidecar_records_the_data_config_and_another_one_rebuilds_the_export(tmp_path, caplog):
    net = _small_net(0)
    export = tmp_path / "small.onnx"
    engines.load_engine(net, "sha256:small", SMALL, export, on("onnxruntime"))
    assert load_json(tmp_path / "small.onnx.json")["data_config"] == SMALL.as_dict()
    other = backbones.get_backbone("efficientnet_lite0").data_config(32)  # 32 px too, but another resize and mean
    with caplog.at_level(logging.INFO, logger="image_similarity.models.engines"):
        assert engines.load_engine(net, "sha256:small", other, export, on("onnxruntime")) is not None
    assert "exported for the data config" in caplog.text
    assert load_json(tmp_path / "small.onnx.json")["data_config"] == other.as_dict()


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_damaged_export_is_rebuilt_not_used(tmp_path, pixels, caplog, backend):
    net = _small_net(0)
    export = tmp_path / "small.onnx"
    engines.load_engine(net, "sha256:small", SMALL, export, on(backend))
    data = export.read_bytes()
    export.write_bytes(data[:len(data) // 2])  # a truncated copy
    with caplog.at_level(logging.INFO, logger="image_similarity.models.engines"):
        engine = engines.load_engine(net, "sha256:small", SMALL, export, on(backend))
    assert "damaged" in caplog.text
    assert export.read_bytes() != data[:len(data) // 2]
    np.testing.assert_allclose(engine(pixels), _torch_out(net, pixels), atol=1e-5)


def test_a_failed_export_falls_back_to_pytorch_with_one_line(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="image_similarity.models.engines"):
        engine = engines.load_engine(_small_net(0), "sha256:small", SMALL, blocker / "small.onnx", on("auto"))
    assert engine is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the ONNX export" in warnings[0].getMessage()


def test_auto_falls_back_when_engines_are_missing(tmp_path, monkeypatch, caplog):
    net = _small_net(0)
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    engine = engines.load_engine(net, "sha256:small", SMALL, tmp_path / "small.onnx", on("auto"))
    assert engine.name == "onnxruntime"

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level(logging.WARNING, logger="image_similarity.models.engines"):
        assert engines.load_engine(net, "sha256:small", SMALL, tmp_path / "small.onnx", on("auto")) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "openvino is not installed" in warnings[0] and "onnxruntime" in warnings[0]


def test_one_compiled_engine_per_network_in_a_process(lite0):
    """Embedders of one network share its compiled engine: a process that opens many models (the API's tests, a
    service with several attributes) holds one engine and its threads, not one each."""
    net, batch, expected, path = lite0
    first = engines.load_engine(net, MODEL_ID, LITE0, path, InferenceConfig("openvino"), streams=2)
    again = engines.load_engine(net, MODEL_ID, LITE0, path, InferenceConfig("openvino"), streams=2)
    other = engines.load_engine(net, MODEL_ID, LITE0, path, InferenceConfig("onnxruntime"), streams=2)
    assert first is again and other is not first and other.name == "onnxruntime"
    assert _min_cosine(again(batch), expected) >= 0.99999
