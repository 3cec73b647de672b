"""Step 2's settings: :class:`RefineConfig` (the ``rf_*`` block of PARAMETERS.py, checked), and the rule that
chooses the input resolution for ``rf_inputResolution = "auto"`` (:func:`auto_input_resolution`).
"""
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import backbones
from .heads import HEADS
from ..data import images

__all__ = ["RefineConfig", "LR_SCHEDULES", "AUTO_RESOLUTIONS", "auto_input_resolution", "auto_input_resolution_of"]

# What rf_inputResolution = "auto" chooses from. On validation 320 px won on every texture run (photos of 340-512 px)
# and lost on the 150-px fridgeObjects thumbnails, whose upscaling adds no detail (doc/RESULTS.md).
AUTO_RESOLUTIONS = (224, 320)
LR_SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class RefineConfig:
    """Hyperparameters of one refinement run (the ``rf_*`` block of PARAMETERS.py).

    Attributes
    ----------
    backbone : str
        Registry name (:func:`backbones.list_backbones`).
    input_resolution : int
        Network input width and height in pixels.
    dropout : float
        Dropout probability before the linear head, in [0, 1).
    batch_size : int
        Images per minibatch.
    max_epochs : int
        Training epochs (>= 1; a run with 0 epochs is the caller's "no refinement" case).
    lr_per_epoch : tuple of float
        With the step schedule, the learning rate of epoch ``i`` (0-based) is ``lr_per_epoch[min(i, len - 1)]``:
        the last value repeats. With the cosine schedule only ``lr_per_epoch[0]`` is used.
    lr_schedule : {'step', 'cosine'}
        'cosine': ``lr_per_epoch[0] * (1 + cos(pi * i / max_epochs)) / 2`` in epoch ``i``.
    backbone_lr_factor : float
        The backbone trains at this fraction (0, 1] of the head's learning rate.
    head : {'linear', 'normsoftmax'}
        :class:`.heads.ImageClassifier`'s head.
    temperature : float
        Of the normalised-softmax head (> 0).
    embedding_dim : int
        Projection of the normalised-softmax head (0 = none).
    crop_scale : float or None
        Smallest area fraction of random-resized-crop in (0, 1]; None = pad-and-crop
        (:meth:`.backbones.DataConfig.train_transform`).
    momentum : float
        SGD momentum.
    weight_decay : float
        L2 weight decay on the trained parameters.
    freeze_backbone : bool
        Train only the head: backbone weights and batch-norm statistics stay as loaded.
    balance : bool
        Oversample smaller labels (by repeating their images) to the size of the largest, re-drawn every epoch.
    max_train_images : int or None
        Most training images per epoch (a fresh random subset each epoch); None = all.
    n_workers : int
        DataLoader worker processes; 0 = load in the main process.
    cpu_bf16 : bool
        On CPU, train under bf16 autocast where the CPU computes bf16 natively (``engines.native_bf16()``, read at
        run time); elsewhere float32, with a warning.
    activation_checkpointing : bool
        Recompute the backbone's activations in the backward pass instead of holding them
        (:func:`.refine.checkpoint_activations`): about half the memory of a training step, a little slower, the same
        weights.
    seed : int
        Seed of the head's initialisation, the sample order, dropout and augmentation.
    """

    backbone: str = "efficientnet_lite0"
    input_resolution: int = 224
    dropout: float = 0.5
    batch_size: int = 32
    max_epochs: int = 8
    lr_per_epoch: tuple = (0.01,)
    lr_schedule: str = "step"
    backbone_lr_factor: float = 1.0
    head: str = "linear"
    temperature: float = 0.05
    embedding_dim: int = 0
    crop_scale: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 0.0005
    freeze_backbone: bool = False
    balance: bool = False
    max_train_images: Optional[int] = None
    n_workers: int = 2
    cpu_bf16: bool = False
    activation_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lr_per_epoch", tuple(float(lr) for lr in (
            self.lr_per_epoch if isinstance(self.lr_per_epoch, (list, tuple)) else [self.lr_per_epoch])))
        backbones.get_backbone(self.backbone)
        checks = [("input_resolution", isinstance(self.input_resolution, int) and self.input_resolution >= 16,
                   ">= 16 pixels"),
                  ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
                  ("batch_size", self.batch_size >= 1, ">= 1"),
                  ("max_epochs", self.max_epochs >= 1, ">= 1"),
                  ("lr_per_epoch", len(self.lr_per_epoch) > 0 and all(lr > 0 for lr in self.lr_per_epoch),
                   "a non-empty list of positive learning rates"),
                  ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
                  ("backbone_lr_factor", 0.0 < self.backbone_lr_factor <= 1.0, "in (0, 1]"),
                  ("head", self.head in HEADS, f"one of {', '.join(HEADS)}"),
                  ("temperature", self.temperature > 0.0, "> 0"),
                  ("embedding_dim", self.embedding_dim >= 0, ">= 0 (0 = no projection)"),
                  ("crop_scale", self.crop_scale is None or 0.0 < self.crop_scale <= 1.0, "None or in (0, 1]"),
                  ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
                  ("max_train_images", self.max_train_images is None or self.max_train_images >= 1, "None or >= 1"),
                  ("n_workers", self.n_workers >= 0, ">= 0"),
                  ("cpu_bf16", isinstance(self.cpu_bf16, bool), "True or False"),
                  ("activation_checkpointing", isinstance(self.activation_checkpointing, bool), "True or False")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be {allowed}")

    def as_dict(self):
        """Plain values (str, numbers, lists), e.g. for a checkpoint's ``meta``."""
        values = asdict(self)
        values["lr_per_epoch"] = list(values["lr_per_epoch"])
        return values


    @property
    def data_config(self):
        """The backbone entry's :class:`.backbones.DataConfig` at ``input_resolution``: what training, validation and
        the saved checkpoint use."""
        return backbones.get_backbone(self.backbone).data_config(self.input_resolution)


def auto_input_resolution(short_sides, candidates=AUTO_RESOLUTIONS):
    """The input resolution that suits images with these shorter sides: what ``rf_inputResolution = "auto"`` runs at.

    Parameters
    ----------
    short_sides : sequence of int or None
        Shorter side of each training image in pixels (:func:`images.shorter_side`); None (unreadable) is left out.
    candidates : sequence of int
        Resolutions to choose from, in pixels.

    Returns
    -------
    (int, float or None)
        The largest candidate no larger than the median shorter side (the smallest candidate when all are larger,
        or when no side is known), and that median.
    """
    known = [side for side in short_sides if side is not None]
    median = float(np.median(known)) if known else None
    fitting = [c for c in candidates if median is not None and c <= median]
    return (max(fitting) if fitting else min(candidates)), median


def auto_input_resolution_of(image_dir, keys, candidates=AUTO_RESOLUTIONS):
    """:func:`auto_input_resolution` of the images ``image_dir / key``, read from their headers only.

    Returns the same (resolution in pixels, median shorter side or None); unreadable images are left out.
    """
    return auto_input_resolution([images.shorter_side(Path(image_dir) / key) for key in keys], candidates)

