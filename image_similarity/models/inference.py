"""How a network runs: one :class:`InferenceConfig` value, and the one function that sets a CPU thread count.

The config is built once (by ``helpers.inference_config`` from PARAMETERS.py's ``run_*`` knobs, or by a caller of the
library) and passed as one argument down to the embedder and its engine. Its defaults are PARAMETERS.py's.
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["BACKENDS", "PRECISIONS", "BF16_BACKENDS", "InferenceConfig", "default_device", "cpu_cores", "set_thread_count"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("f32", "bf16")
BF16_BACKENDS = ("auto", "openvino")  # the engines that compute in bf16 ("auto" picks OpenVINO for it)


@dataclass(frozen=True)
class InferenceConfig:
    """Where and how the forward pass runs.

    Attributes
    ----------
    backend : {'auto', 'torch', 'openvino', 'onnxruntime'}
        The inference engine (:mod:`.engines`); ``'auto'``: the fastest installed engine on CPU, PyTorch on CUDA.
    precision : {'f32', 'bf16'}
        ``'bf16'``: OpenVINO only, and only where the CPU computes bf16 natively (else f32, with a warning).
    device : str or None
        ``'cpu'``, ``'cuda'``, ``'cuda:1'`` ...; None = CUDA when available, else CPU.
    threads : int or None
        CPU threads of the forward pass (torch's intra-op threads, an engine's streams); None = every core this
        process may run on, unless ``OMP_NUM_THREADS`` sets the count (:func:`set_thread_count`).
    """

    backend: str = "auto"
    precision: str = "f32"
    device: Optional[str] = None
    threads: Optional[int] = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"run_backend={self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"run_precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.precision == "bf16" and self.backend not in BF16_BACKENDS:
            raise ValueError(f"run_precision='bf16' runs on OpenVINO only: use run_backend='openvino' or 'auto', "
                             f"or run_precision='f32' with {self.backend!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads={self.threads!r}: expected None (every core) or an int >= 1")


def default_device(device=None):
    """``torch.device(device)``, or CUDA when available, else CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_cores():
    """The number of cores this process may run on (its CPU affinity; torch and os.cpu_count count the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_thread_count(threads=None):
    """Set torch's intra-op thread count for this process (the only place that does); return the count now in force.

    Parameters
    ----------
    threads : int or None
        Threads to use; None = every core this process may run on (:func:`cpu_cores`), unless ``OMP_NUM_THREADS``
        is set, whose count torch already took at start-up and which is then left alone.

    Returns
    -------
    int
        ``torch.get_num_threads()`` afterwards.
    """
    import torch

    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        threads = cpu_cores()
    if torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))
        logger.debug("torch intra-op threads: %d", torch.get_num_threads())
    return torch.get_num_threads()
