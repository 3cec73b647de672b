"""CPU inference engines (OpenVINO, ONNX Runtime) for the embedding network, behind one callable.

What runs is chosen by one :class:`.inference.InferenceConfig` (backend, precision, threads). The network is exported
once to ONNX, which both engines read, and cached: beside a refined checkpoint (``model.pt`` -> ``model.onnx``) or,
for a pretrained registry backbone, in a cache folder. A JSON sidecar written after the export records the
``model_id`` and the :class:`.backbones.DataConfig` the export came from and the export file's SHA-256, so an export
of another model (the checkpoint was retrained) or a damaged file is detected and rebuilt, never used. Every way this
can fail (engine not installed, export or compilation error) falls back to PyTorch with one log line saying why.

``backend="auto"`` takes the first engine of :data:`AUTO_ORDER` that is installed and works on CPU, and PyTorch on
CUDA. ``precision="bf16"`` (OpenVINO only) is honoured only where the CPU computes bf16 natively (AVX512-BF16 or
AMX); elsewhere it is emulated and far slower, so f32 is used and a warning says so.
"""
import copy
import importlib
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..data.fileio import atomic_path, load_json, save_json
from .inference import InferenceConfig, default_device

__all__ = ["AUTO_ORDER", "Engine", "load_engine", "export_onnx", "export_path_for", "default_cache_dir",
           "native_bf16", "cpu_info", "EXPORT_FORMAT"]

logger = logging.getLogger(__name__)

# OpenVINO first: its f32 forward of Lite0 at 320 px ran 1.2-1.3x ONNX Runtime's on a 2-core AMD EPYC and ~1.2x on
# an Intel Xeon (issue 17's probe), 2.5-3x PyTorch eager; bench/featurize.py measures all three in one run.
AUTO_ORDER = ("openvino", "onnxruntime")
EXPORT_FORMAT = "image_similarity.onnx_export/2"
# Images per forward pass on one stream: small chunks kept the streams' working set in cache (bench/featurize.py).
CHUNK_IMAGES = 2
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


def cpu_info():
    """``{"model": str, "flags": [...]}``: the CPU model name and its vector-arithmetic flags (/proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": "unknown", "flags": []}
    field = {}
    for line in lines:
        key, _, value = line.partition(":")
        field.setdefault(key.strip(), value.strip())
    flags = [f for f in field.get("flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    return {"model": field.get("model name", "unknown"), "flags": flags}


def native_bf16():
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo), read at run time."""
    return any(flag in cpu_info()["flags"] for flag in _BF16_FLAGS)


def default_cache_dir():
    """Where exports of pretrained registry backbones are cached: ``$XDG_CACHE_HOME/image_similarity/engines``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "image_similarity" / "engines"


def export_path_for(model_id, input_resolution, checkpoint=None, cache_dir=None):
    """The ONNX file of a model: beside its checkpoint, else ``<cache_dir>/<model_id>-<r>px.onnx``."""
    if checkpoint is not None:
        return Path(checkpoint).with_suffix(".onnx")
    return Path(cache_dir or default_cache_dir()) / f"{model_id.replace(':', '-')}-{int(input_resolution)}px.onnx"


def _sidecar(path):
    return Path(path).with_suffix(".onnx.json")


def _sha256(path):
    from .backbones import file_sha256
    return file_sha256(path)


def export_onnx(net, path, model_id, data_config):
    """Export ``net`` ((N, 3, r, r) float32 -> (N, D)) to ONNX at ``path``, batch size free, then its sidecar.

    The sidecar records ``model_id`` and ``data_config`` (a :class:`.backbones.DataConfig`, r its ``input_size``).
    Both files are written atomically, the sidecar last (and removed first), so an interrupted export is never
    taken for a finished one.
    """
    import torch
    path, resolution = Path(path), int(data_config.input_size)
    _sidecar(path).unlink(missing_ok=True)
    example = torch.zeros(2, 3, resolution, resolution)
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    net = net if on_cpu else copy.deepcopy(net).cpu()
    was_training = net.training
    net.eval()
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]  # hundreds of INFO lines per export
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)
    try:
        with atomic_path(path) as tmp:
            torch.onnx.export(net, (example,), str(tmp), input_names=["pixels"], output_names=["features"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                              external_data=False, verbose=False)
    finally:
        net.train(was_training)
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    save_json(_sidecar(path), {"format": EXPORT_FORMAT, "model_id": model_id, "data_config": data_config.as_dict(),
                               "sha256": _sha256(path), "torch": torch.__version__})
    logger.info("exported %s at %d px to %s", model_id, resolution, path)
    return path


def _stale_reason(path, model_id, data_config):
    """Why the export at ``path`` cannot be used for this model (None when it can)."""
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return "no export yet"
    try:
        meta = load_json(side)
    except (OSError, ValueError) as err:
        return f"unreadable sidecar {side} ({err})"
    if meta.get("format") != EXPORT_FORMAT or meta.get("model_id") != model_id:
        return f"it was exported from {meta.get('model_id')}, not {model_id}"
    if meta.get("data_config") != data_config.as_dict():
        return f"it was exported for the data config {meta.get('data_config')}, not {data_config.as_dict()}"
    if meta.get("sha256") != _sha256(path):
        return f"{path.name} does not match its recorded SHA-256 (damaged)"
    return None


class Engine:
    """A compiled network: a float32 NCHW batch (ndarray or CPU tensor) -> (n, D) float32 ndarray; thread-safe.

    The engine runs ``streams`` forward passes at once, each on one core (OpenVINO's throughput mode, or concurrent
    ONNX Runtime runs of one thread each): on this small network that does more images per second than one pass
    spread over all cores (bench/featurize.py). A batch is cut into chunks of :data:`CHUNK_IMAGES` that run on the
    streams side by side; calls from several threads (the service) share the same streams.

    Attributes
    ----------
    name : str
        ``"openvino"`` or ``"onnxruntime"``.
    precision : str
        ``"f32"`` or ``"bf16"``: what the engine computes in.
    path : Path
        The ONNX export it runs.
    streams : int
        Forward passes run at once.
    """

    def __init__(self, name, precision, path, run, streams=1):
        self.name, self.precision, self.path, self._run = name, precision, Path(path), run
        self.streams = int(streams)
        self._pool = ThreadPoolExecutor(self.streams, f"{name}-stream") if self.streams > 1 else None

    def __call__(self, batch):
        pixels = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, dtype=np.float32)
        if self._pool is None or len(pixels) <= CHUNK_IMAGES:
            out = self._run(pixels)
        else:
            chunks = [pixels[i:i + CHUNK_IMAGES] for i in range(0, len(pixels), CHUNK_IMAGES)]
            out = np.concatenate(list(self._pool.map(self._run, chunks)))
        return np.asarray(out, dtype=np.float32)

    def __repr__(self):
        return f"Engine({self.name}, {self.precision}, {self.streams} streams, {self.path.name})"


def _stream_pool(requests):
    """``run(pixels)`` over a pool of per-stream callables: each call takes a free one, waiting when all are busy."""
    free = queue.SimpleQueue()
    for request in requests:
        free.put(request)

    def run(pixels):
        request = free.get()
        try:
            return request(pixels)
        finally:
            free.put(request)
    return run


def _openvino(path, precision, streams):
    ov = importlib.import_module("openvino")
    core = ov.Core()
    # The precision hint is always set: on CPUs with AMX, OpenVINO would pick bf16 by itself.
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": streams, "NUM_STREAMS": streams,
        "PERFORMANCE_HINT": "THROUGHPUT"})
    streams = int(compiled.get_property("NUM_STREAMS"))

    def request_runner():
        request = compiled.create_infer_request()

        def run(pixels):  # infer() releases the GIL, so the streams really run side by side
            request.infer({0: pixels})
            return request.get_output_tensor(0).data.copy()
        return run
    return _stream_pool([request_runner() for _ in range(streams)]), streams


def _onnxruntime(path, precision, streams):
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core per run; ``streams`` runs at once (run() releases the GIL)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _stream_pool([lambda pixels: session.run(None, {"pixels": pixels})[0]] * streams), streams


_COMPILERS = {"openvino": _openvino, "onnxruntime": _onnxruntime}
# One compiled engine per (engine, precision, export file and its SHA-256, streams) in a process: embedders of the same
# network share it (an Engine is thread-safe), instead of each compiling its own copy with its own threads.
_COMPILED = {}
_COMPILING = threading.Lock()


def load_engine(net, model_id, data_config, export_path, inference=None, streams=1):
    """The engine that will run ``net``, or None for PyTorch (with one log line saying why, when asked otherwise).

    Parameters
    ----------
    net : torch.nn.Module
        (N, 3, r, r) float32 -> (N, D), in eval mode.
    model_id : str
        ``backbones.model_id`` of the network: what the cached export must come from.
    data_config : backbones.DataConfig
        Its preprocessing; r is ``data_config.input_size``. The cached export must have been made for it.
    export_path : str or Path
        Where the ONNX export lives (see :func:`export_path_for`); exported or re-exported when stale or damaged.
    inference : inference.InferenceConfig, optional
        ``backend``: ``"auto"`` is the first of :data:`AUTO_ORDER` that is installed and works on CPU, PyTorch on
        CUDA (``device``); ``precision``: bf16 only on OpenVINO and only where :func:`native_bf16`, elsewhere f32
        with a warning. Default ``InferenceConfig()``.
    streams : int
        Forward passes run at once, one core each (the thread count :func:`.inference.set_thread_count` applied).

    Returns
    -------
    Engine or None
    """
    inference = inference or InferenceConfig()
    backend, precision = inference.backend, inference.precision
    if backend == "torch" or (backend == "auto" and default_device(inference.device).type == "cuda"):
        return None
    if precision == "bf16" and not native_bf16():
        logger.warning("run_precision='bf16' asked for, but this CPU has no native bf16 (none of %s in "
                       "/proc/cpuinfo), where it is emulated and slower: running f32", ", ".join(_BF16_FLAGS))
        precision = "f32"
    candidates = ("openvino",) if precision == "bf16" else AUTO_ORDER if backend == "auto" else (backend,)
    reasons, path, installed = [], Path(export_path), []
    for name in candidates:
        try:
            importlib.import_module(name)
            installed.append(name)
        except ImportError as err:
            reasons.append(f"{name} is not installed ({err}; pip install '.[inference]')")
    if installed and _ensure_export(net, model_id, data_config, path, reasons):
        for name in installed:
            with _COMPILING:
                engine = _COMPILED.get((name, precision, str(path.resolve()), _sha256(path), streams))
                if engine is None:
                    engine = _compile(name, precision, net, model_id, data_config, path, reasons, streams)
                    if engine is not None:  # keyed by the export it loaded, which a failed first load rebuilds
                        _COMPILED[(name, precision, str(path.resolve()), _sha256(path), streams)] = engine
            if engine is not None:
                logger.info("inference engine: %s, %s, %d streams, on %s", name, precision, engine.streams, path)
                return engine
    logger.warning("inference engine: running PyTorch because %s", "; ".join(reasons))
    return None


def _compile(name, precision, net, model_id, data_config, path, reasons, streams):
    """Load the export into engine ``name``; an export it cannot load is rebuilt once. None (and why) on failure."""
    for attempt in range(2):
        try:
            run, streams = _COMPILERS[name](path, precision, streams)
            # One pass per stream here, one at a time: the engines set up their per-process state on a first call
            # (pybind11 statics behind OpenVINO's Tensor.data), and two streams doing that at once deadlocked.
            size = int(data_config.input_size)
            warm_up = np.zeros((1, 3, size, size), np.float32)
            for _ in range(streams):
                run(warm_up)
            return Engine(name, precision, path, run, streams)
        except Exception as err:  # each engine has its own load errors (RuntimeError, onnxruntime's Fail ...)
            if attempt or not _ensure_export(net, model_id, data_config, path, reasons, force=True):
                reasons.append(f"{name} could not load {path} ({type(err).__name__}: {err})")
    return None


def _ensure_export(net, model_id, data_config, path, reasons, force=False):
    """Export ``net`` to ``path`` unless a valid export of this model is there; False (and why) when that fails."""
    stale = "the engine could not load it" if force else _stale_reason(path, model_id, data_config)
    if stale is None:
        return True
    logger.info("exporting %s to ONNX: %s", model_id, stale)
    try:
        export_onnx(net, path, model_id, data_config)
    except Exception as err:  # the exporter's failures share no base class
        reasons.append(f"the ONNX export to {path} failed ({type(err).__name__}: {err})")
        return False
    return True
