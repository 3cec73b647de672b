"""Refined checkpoints: an :class:`.heads.ImageClassifier` with its backbone name, classes and data config.

A checkpoint is a ``weights_only`` torch archive (plain values and tensors, so reading it runs no code) written
atomically. It holds the :class:`.backbones.DataConfig` the network was trained with, so whoever loads it (the
embedder, the ONNX export's sidecar) preprocesses images the same way.
"""
from pathlib import Path

import torch

from ..data.fileio import atomic_path
from .backbones import TORCH_LOAD_ERRORS, DataConfig, create_model, get_backbone, model_id
from .heads import ImageClassifier

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "checkpoint_meta", "load_checkpoint"]

CHECKPOINT_FORMAT = "image_similarity.checkpoint/1"


def save_checkpoint(path, model, backbone_name, classes, data_config, meta=None):
    """Write a refined :class:`.heads.ImageClassifier` atomically, with what is needed to rebuild and use it.

    Parameters
    ----------
    path : str or Path
    model : heads.ImageClassifier
    backbone_name : str
        Registry name of its backbone.
    classes : sequence of str
        Label names in label-id order.
    data_config : backbones.DataConfig
        The preprocessing it was trained with (its eval transform is what every later forward pass uses).
    meta : dict, optional
        Plain values only (str, numbers, lists, dicts), so the file loads with ``weights_only=True``.

    Returns
    -------
    Path
    """
    get_backbone(backbone_name)
    payload = {"format": CHECKPOINT_FORMAT, "backbone": backbone_name, "classes": list(classes),
               "data_config": data_config.as_dict(), "dropout": float(model.head[0].p),
               "head": model.head_kind, **model.head_params, "meta": dict(meta or {}),
               "state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _read_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        raise ValueError(f"{path}: not an image_similarity checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an image_similarity checkpoint (no {CHECKPOINT_FORMAT!r} format tag)")
    return payload


def checkpoint_meta(path):
    """The ``meta`` dict saved by :func:`save_checkpoint` (e.g. step 2's validation comparison); errors as
    :func:`load_checkpoint`."""
    return _read_checkpoint(path)["meta"]


def load_checkpoint(path, map_location="cpu"):
    """Rebuild the :class:`.heads.ImageClassifier` saved by :func:`save_checkpoint`.

    Returns
    -------
    (ImageClassifier in eval mode, dict)
        The dict holds ``backbone``, ``classes``, ``data_config`` (a :class:`.backbones.DataConfig`), ``dropout``,
        ``head``, ``meta`` and ``model_id``.

    Raises
    ------
    ValueError
        When ``path`` is not one of our checkpoints (names the path).
    """
    payload = _read_checkpoint(path, map_location)
    backbone = create_model(payload["backbone"], pretrained=False)
    head = payload.get("head", "linear")  # checkpoints from before the normalised-softmax head have a linear one
    model = ImageClassifier(backbone, len(payload["classes"]), payload["dropout"], head,
                            payload.get("temperature", 0.05), payload.get("embedding_dim", 0))
    model.load_state_dict(payload["state_dict"], strict=True)
    if "data_config" in payload:
        data_config = DataConfig.from_dict(payload["data_config"], path)
    else:  # checkpoints from before the data config held only the input resolution
        data_config = get_backbone(payload["backbone"]).data_config(payload["input_resolution"])
    info = {k: payload[k] for k in ("backbone", "classes", "dropout", "meta")}
    info.update(head=head, data_config=data_config, model_id=model_id(path))
    return model.eval(), info
