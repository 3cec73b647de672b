"""Refine (fine-tune) a pretrained backbone as an image classifier: the tutorial's step 2.

The backbone plus a dropout + classification head (:class:`backbones.ImageClassifier`: the tutorial's linear layer
or a normalised-softmax cosine classifier) is trained with SGD and momentum on the training split, with the
backbone's training augmentation (optionally random-resized-crop), a step or cosine learning-rate schedule and
optionally a lower learning rate for the backbone than for the head. After every epoch it is evaluated on the
validation split and the epoch with the best validation accuracy (ties: the lower validation loss) is kept.
:func:`compare_on_validation` then ranks the validation ranking sets by cosine distance with the refined embedding
and with the pretrained one, so that step 2 can keep the pretrained network when it ranks better. The test split is
never seen here.

After every epoch a resume checkpoint (weights, optimizer, best-so-far weights, log rows and every random state) is
written atomically, so an interrupted run continues with ``fine_tune(..., resume=True)``. On CPU with
``n_workers=0``, the same seed and the same torch thread count (float sums may be split differently across another
number of threads), a resumed run ends with exactly the weights of an uninterrupted one: each epoch's sample order
and DataLoader seed are derived from ``(seed, epoch)`` and the global RNG states (dropout, augmentation) are saved
and restored.

Speed: inputs and weights use the channels-last memory format (faster convolutions on CPU and GPU), CPU runs use
every available core, images are decoded in DataLoader worker processes, and on CUDA the forward pass runs under
mixed precision (``torch.autocast`` + ``GradScaler``) from pinned memory.
"""
import hashlib
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import backbones, engines
from ..data import images
from .embedder import Embedder, ImageDataset, collate_good_bad
from .embedder import default_device as select_device
from ..data.fileio import atomic_path, remove_stale_temporaries

__all__ = ["RefineConfig", "RefineResult", "LOG_COLUMNS", "LR_SCHEDULES", "LabelledImages",
           "AUTO_RESOLUTIONS", "auto_input_resolution", "auto_input_resolution_of", "select_device",
           "configure_threads", "lr_for_epoch", "epoch_indices", "make_loader", "train_one_epoch",
           "evaluate", "load_resume_checkpoint", "fine_tune", "validation_ranking", "compare_on_validation",
           "pretrained_ranks_better"]

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_err", "val_loss", "val_err", "seconds")
RESUME_FORMAT = "image_similarity.refine_resume/1"
# Settings that may differ between an interrupted run and its resumption: more epochs extend a finished run.
RESUMABLE_CHANGES = ("max_epochs", "n_workers", "cpu_bf16")
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
        :class:`backbones.ImageClassifier`'s head.
    temperature : float
        Of the normalised-softmax head (> 0).
    embedding_dim : int
        Projection of the normalised-softmax head (0 = none).
    crop_scale : float or None
        Smallest area fraction of random-resized-crop in (0, 1]; None = pad-and-crop
        (:func:`backbones.train_transform`).
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
                  ("head", self.head in backbones.HEADS, f"one of {', '.join(backbones.HEADS)}"),
                  ("temperature", self.temperature > 0.0, "> 0"),
                  ("embedding_dim", self.embedding_dim >= 0, ">= 0 (0 = no projection)"),
                  ("crop_scale", self.crop_scale is None or 0.0 < self.crop_scale <= 1.0, "None or in (0, 1]"),
                  ("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)"),
                  ("weight_decay", self.weight_decay >= 0.0, ">= 0"),
                  ("max_train_images", self.max_train_images is None or self.max_train_images >= 1, "None or >= 1"),
                  ("n_workers", self.n_workers >= 0, ">= 0"),
                  ("cpu_bf16", isinstance(self.cpu_bf16, bool), "True or False")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}: must be {allowed}")

    def as_dict(self):
        """Plain values (str, numbers, lists), e.g. for a checkpoint's ``meta``."""
        values = asdict(self)
        values["lr_per_epoch"] = list(values["lr_per_epoch"])
        return values


@dataclass
class RefineResult:
    """What :func:`fine_tune` returns.

    Attributes
    ----------
    model : backbones.ImageClassifier
        The best epoch's weights, on CPU, contiguous memory format, eval mode.
    best_epoch : int
        1-based epoch whose weights ``model`` holds.
    best_val_accuracy, best_val_loss : float
        Validation accuracy (fraction in [0, 1]) and mean cross-entropy of that epoch; NaN without validation images.
    log_rows : list of dict
        One per epoch (including epochs run before a resume), keys :data:`LOG_COLUMNS`; losses are mean
        cross-entropy per image, errors are fractions in [0, 1], ``seconds`` is wall time.
    n_train, n_val : int
        Training images per epoch (after balancing and ``max_train_images``) and validation images.
    resumed_after_epoch : int
        Epochs taken from the resume checkpoint (0 for a fresh run).
    seconds : float
        Wall time of this call.
    """

    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    log_rows: list
    n_train: int
    n_val: int
    resumed_after_epoch: int
    seconds: float


# ---------------------------------------------------------------- data

class LabelledImages(ImageDataset):
    """Labelled image files read through :func:`images.load_image`: an :class:`embedder.ImageDataset` with label ids.

    Parameters
    ----------
    img_dir : str or Path
        Folder the keys are relative to.
    items : sequence of (str, int)
        ``(key, label_id)`` pairs, key like ``"label/file.jpg"``.
    transform : callable
        PIL RGB image -> tensor of shape (3, r, r).

    Items are those of :class:`embedder.ImageDataset`; ``labels`` is the int64 tensor of the label ids.
    """

    def __init__(self, img_dir, items, transform):
        items = list(items)
        super().__init__([Path(img_dir) / key for key, _ in items], transform)
        self.labels = torch.tensor([y for _, y in items], dtype=torch.long)


def epoch_indices(labels, epoch, seed, balance=False, max_images=None):
    """The training sample order of one epoch, a function of ``(seed, epoch)`` only.

    Parameters
    ----------
    labels : sequence of int
        Label id of every training item.
    epoch : int
        0-based epoch.
    balance : bool
        Repeat the items of every smaller label until it has as many as the largest (the remainder is a random
        subset, drawn anew each epoch).
    max_images : int or None
        Keep only the first ``max_images`` of the shuffled order.

    Returns
    -------
    list of int
        Indices into ``labels``, shuffled.
    """
    rng = np.random.default_rng([seed, epoch])
    labels = np.asarray(labels)
    if balance and len(labels):
        groups = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        target = max(len(group) for group in groups)
        parts = []
        for group in groups:
            repeats, extra = divmod(target, len(group))
            parts += [np.tile(group, repeats), rng.choice(group, extra, replace=False)]
        indices = np.concatenate(parts)
    else:
        indices = np.arange(len(labels))
    indices = rng.permutation(indices)
    return indices[:max_images].tolist() if max_images is not None else indices.tolist()


def make_loader(dataset, indices, batch_size, n_workers, device, seed=0, training=False):
    """A DataLoader over ``dataset[indices]`` in that order, batches from :func:`embedder.collate_good_bad`.

    ``seed`` seeds the worker processes (their augmentation randomness). With ``training``, a last batch of a single
    image is dropped: batch norm cannot train on one image whose final feature map is 1x1.
    """
    indices = list(indices)
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=n_workers,
                      collate_fn=collate_good_bad, pin_memory=device.type == "cuda",
                      drop_last=training and len(indices) % batch_size == 1 and len(indices) > 1,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- device

def configure_threads(device):
    """On CPU, let torch use every core this process may run on (unless OMP_NUM_THREADS says otherwise).

    Returns the intra-op thread count.
    """
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        n_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, n_cores or 1))
    return torch.get_num_threads()


# ---------------------------------------------------------------- one epoch

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


def lr_for_epoch(lr_per_epoch, epoch, schedule="step", max_epochs=None):
    """Learning rate of 0-based ``epoch``.

    'step': ``lr_per_epoch[epoch]``, the last value repeating. 'cosine': ``lr_per_epoch[0]`` decayed along a half
    cosine that would reach 0 after ``max_epochs`` epochs.
    """
    if schedule == "cosine":
        return float(lr_per_epoch[0]) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epochs))
    return float(lr_per_epoch[min(epoch, len(lr_per_epoch) - 1)])


def _set_train_mode(model, freeze_backbone):
    model.train()
    if freeze_backbone:
        model.backbone.eval()  # frozen batch-norm statistics too, not only frozen weights


def _device_batches(batches, dataset, device, memory_format, skipped):
    """Yield ``(images, labels)`` on ``device`` from collated batches, recording bad images, skipping empty batches."""
    for indices, images, bad in batches:
        for i, reason in bad:
            if skipped is not None:
                skipped.add(dataset.sources[i], reason)
        if indices:
            yield (images.to(device, memory_format=memory_format, non_blocking=True),
                   dataset.labels[indices].to(device, non_blocking=True))


def train_one_epoch(model, loader, optimizer, scaler, device, freeze_backbone=False,
                    memory_format=torch.channels_last, skipped=None, desc="train", progress=True, cpu_bf16=False):
    """One pass of SGD over ``loader``.

    Parameters
    ----------
    model : backbones.ImageClassifier
        Already on ``device`` in ``memory_format``.
    scaler : torch.amp.GradScaler
        Enabled for CUDA mixed precision; disabled on CPU (full float32).
    memory_format : torch.memory_format
        Layout of the input batches.
    skipped : SkippedImages, optional
        Receives the unreadable images.
    cpu_bf16 : bool
        On CPU, train under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (worth it only where the CPU computes
        bf16 natively, ``engines.native_bf16()``; bf16 has float32's range, so no loss scaling).

    Returns
    -------
    (float, float, int)
        Mean cross-entropy per image, error rate in [0, 1], images trained on.
    """
    _set_train_mode(model, freeze_backbone)
    criterion = nn.CrossEntropyLoss()
    use_amp = device.type == "cuda" or cpu_bf16
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    total_loss, n_wrong, n_seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)
    for images, labels in _device_batches(bar, loader.dataset, device, memory_format, skipped):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = len(labels)
        total_loss += loss.item() * n
        n_wrong += (logits.argmax(1) != labels).sum().item()
        n_seen += n
        bar.set_postfix(loss=f"{total_loss / n_seen:.3f}", acc=f"{1 - n_wrong / n_seen:.3f}")
    if not n_seen:
        return math.nan, math.nan, 0
    return total_loss / n_seen, n_wrong / n_seen, n_seen


def evaluate(model, dataset, batch_size, n_workers, device, skipped=None, desc="val", progress=True):
    """Mean cross-entropy per image, error rate in [0, 1] and image count of ``model`` over ``dataset``.

    The forward passes are :class:`embedder.Embedder`'s, with the classifier's logits as outputs. ``dataset`` is a
    :class:`LabelledImages` with a ``backbones.EvalTransform``. NaN loss and error when no image is readable.
    """
    model.eval()
    net = Embedder(model, dataset.transform, "refining", "image classifier", dataset.transform.resize_crop.size,
                   dim=model.n_classes, device=device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, n_wrong, n_seen = 0.0, 0, 0
    for indices, logits in net.iter_batches(dataset.sources, batch_size, n_workers, skipped, desc=desc,
                                            progress=progress):
        logits, labels = torch.from_numpy(logits), dataset.labels[indices]
        total_loss += criterion(logits, labels).item()
        n_wrong += (logits.argmax(1) != labels).sum().item()
        n_seen += len(labels)
    if not n_seen:
        return math.nan, math.nan, 0
    return total_loss / n_seen, n_wrong / n_seen, n_seen


# ---------------------------------------------------------------- resume checkpoints

def _rng_states():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's state as plain values and a tensor, so the checkpoint loads with weights_only=True
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def _restore_rng_states(states):
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def _data_signature(classes, train_items, val_items):
    """SHA-256 of the classes and the split's keys: a resume must see the same data."""
    digest = hashlib.sha256()
    for part in (classes, train_items, val_items):
        digest.update(repr(list(part)).encode("utf-8"))
    return digest.hexdigest()


def _cpu_copy(state_dict):
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def load_resume_checkpoint(path, config, signature):
    """The state saved by an earlier run of the same configuration on the same data.

    Raises
    ------
    ValueError
        When ``path`` is not a resume checkpoint, or was made with other settings or other images (names them).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... for broken files
        raise ValueError(f"{path}: not a readable resume checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a refinement resume checkpoint (no {RESUME_FORMAT!r} format tag)")
    now, then = config.as_dict(), state["config"]
    changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and then.get(k) != now[k]]
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed)}): run without --resume to "
                         "start over")
    if state["data_signature"] != signature:
        raise ValueError(f"{path} was made on other images or labels: run without --resume to start over")
    return state


def _is_better(row, best):
    """Higher validation accuracy wins, then lower validation loss; without validation the latest epoch wins."""
    if best is None or math.isnan(row["val_err"]):
        return True
    return (row["val_err"], row["val_loss"]) < (best["val_err"], best["val_loss"])


# ---------------------------------------------------------------- the run

def fine_tune(config, train_items, val_items, img_dir, classes, device=None, checkpoint_path=None, resume=False,
              skipped=None, progress=True):
    """Train :class:`backbones.ImageClassifier` on ``train_items`` and keep the best epoch on ``val_items``.

    Parameters
    ----------
    config : RefineConfig
    train_items, val_items : sequence of (str, int)
        ``(key, label_id)`` with key relative to ``img_dir``; label ids index ``classes``. ``val_items`` may be
        empty: then the last epoch is kept.
    img_dir : str or Path
    classes : sequence of str
        Label names in label-id order.
    device : torch.device or str, optional
        Default: CUDA when available, else CPU.
    checkpoint_path : str or Path, optional
        Resume checkpoint written atomically after every epoch; None = none.
    resume : bool
        Continue from ``checkpoint_path`` when it exists (same settings and data required; ``max_epochs`` may grow).
        Otherwise any existing checkpoint is overwritten after the first epoch.
    skipped : SkippedImages, optional
        Receives the unreadable images.

    Returns
    -------
    RefineResult
    """
    start_time = time.perf_counter()
    device = select_device(device)
    if not train_items:
        raise ValueError("no training images: the train split is empty")
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"refinement needs at least 2 labels, got {n_classes}: {list(classes)}")
    bad_ids = sorted({y for _, y in [*train_items, *val_items] if not 0 <= y < n_classes})
    if bad_ids:
        raise ValueError(f"label ids {bad_ids} are outside 0..{n_classes - 1} ({n_classes} classes)")
    signature = _data_signature(classes, train_items, val_items)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    state = None
    if checkpoint_path:
        remove_stale_temporaries(checkpoint_path)
        if resume and checkpoint_path.exists():
            state = load_resume_checkpoint(checkpoint_path, config, signature)

    # Global seeding: dropout and torchvision's augmentation draw from the global torch RNG.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    spec = backbones.get_backbone(config.backbone)
    backbone = backbones.create_model(config.backbone, pretrained=state is None)
    model = backbones.ImageClassifier(backbone, n_classes, config.dropout, config.head, config.temperature,
                                      config.embedding_dim)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    model.to(device, memory_format=torch.channels_last)
    # One group per learning rate: the head's, and the backbone's at backbone_lr_factor of it.
    groups = [{"params": [p for p in part.parameters() if p.requires_grad], "lr_factor": factor}
              for part, factor in ((model.head, 1.0), (model.backbone, config.backbone_lr_factor))]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr_per_epoch[0],
                                momentum=config.momentum, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    start_epoch, log_rows, best = 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, log_rows, best = state["epoch"], list(state["log_rows"]), state["best"]
        _restore_rng_states(state["rng"])
        logger.info("resuming %s after epoch %d of %d", checkpoint_path, start_epoch, config.max_epochs)

    train_set = LabelledImages(img_dir, train_items,
                               backbones.train_transform(spec, config.input_resolution, config.crop_scale))
    val_set = LabelledImages(img_dir, val_items, backbones.eval_transform(spec, config.input_resolution))
    labels = [y for _, y in train_items]
    n_train = len(epoch_indices(labels, 0, config.seed, config.balance, config.max_train_images))
    cpu_bf16 = config.cpu_bf16 and device.type == "cpu" and engines.native_bf16()
    if config.cpu_bf16 and not cpu_bf16:
        logger.warning("bf16 training asked for, but %s: training in float32", "the network is on CUDA (mixed "
                       "precision there)" if device.type != "cpu" else "this CPU has no native bf16")
    for epoch in range(start_epoch, config.max_epochs):
        epoch_start = time.perf_counter()
        lr = lr_for_epoch(config.lr_per_epoch, epoch, config.lr_schedule, config.max_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        indices = epoch_indices(labels, epoch, config.seed, config.balance, config.max_train_images)
        loader = make_loader(train_set, indices, config.batch_size, config.n_workers, device,
                             seed=config.seed * 1_000_003 + epoch, training=True)
        tag = f"epoch {epoch + 1}/{config.max_epochs}"
        train_loss, train_err, _ = train_one_epoch(model, loader, optimizer, scaler, device, config.freeze_backbone,
                                                   skipped=skipped, desc=f"{tag} train", progress=progress,
                                                   cpu_bf16=cpu_bf16)
        val_loss, val_err, _ = evaluate(model, val_set, config.batch_size, config.n_workers, device, skipped=skipped,
                                        desc=f"{tag} val", progress=progress)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_err": train_err,
               "val_loss": val_loss, "val_err": val_err, "seconds": time.perf_counter() - epoch_start}
        log_rows.append(row)
        logger.info("%s: lr %g, train loss %.4f err %.3f, val loss %.4f err %.3f, %.1f s", tag, lr, train_loss,
                    train_err, val_loss, val_err, row["seconds"])
        if _is_better(row, best):
            best = {"epoch": epoch + 1, "val_err": val_err, "val_loss": val_loss,
                    "state_dict": _cpu_copy(model.state_dict())}
        if checkpoint_path:
            payload = {"format": RESUME_FORMAT, "epoch": epoch + 1, "config": config.as_dict(),
                       "data_signature": signature, "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best": best,
                       "log_rows": log_rows, "rng": _rng_states()}
            with atomic_path(checkpoint_path) as tmp:
                torch.save(payload, tmp)

    if not val_items:
        logger.warning("no validation images: keeping the last epoch's weights")
    model.load_state_dict(best["state_dict"])
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return RefineResult(model=model, best_epoch=best["epoch"], best_val_accuracy=1.0 - best["val_err"],
                        best_val_loss=best["val_loss"], log_rows=log_rows, n_train=n_train, n_val=len(val_items),
                        resumed_after_epoch=state["epoch"] if state else 0,
                        seconds=time.perf_counter() - start_time)



# ---------------------------------------------------------------- refined or pretrained: validation decides

def validation_ranking(embedder, img_dir, ranking_sets, batch_size=32, n_workers=0, skipped=None):
    """How well ``embedder``'s cosine distance ranks ``ranking_sets``.

    Parameters
    ----------
    embedder : embedder.Embedder
    img_dir : str or Path
        Folder the ranking sets' keys are relative to.
    ranking_sets : list of splits.RankingSet
        The validation ranking sets (never the test split).

    Returns
    -------
    dict
        ``{'top1': fraction in [0, 1], 'mean_rank': float, 'n_sets': int}``. An embedding with NaN or infinite
        values (a diverged network) gets top-1 0 and the worst mean rank.
    """
    from ..pipeline.evaluation import mean_rank, rank_ranking_sets, top_k_accuracy
    from ..data.features import Features
    from ..search.rankers import CosineRanker

    keys = sorted({k for s in ranking_sets for k in (s.query, *s.references)})
    found, matrix = embedder.embed_files([Path(img_dir) / k for k in keys], img_dir, batch_size, n_workers, skipped)
    sets = [s for s in ranking_sets if {s.query, *s.references} <= set(found)]  # unreadable images drop their sets
    if not sets:
        raise ValueError(f"no validation ranking set has all its images readable under {img_dir}")
    if not np.isfinite(matrix).all():
        return {"top1": 0.0, "mean_rank": float(max(len(s.references) for s in sets)), "n_sets": len(sets)}
    ranks = rank_ranking_sets(CosineRanker(), Features(found, matrix, {}), sets)
    return {"top1": top_k_accuracy(ranks, 1), "mean_rank": mean_rank(ranks), "n_sets": len(sets)}


def compare_on_validation(model, backbone, input_resolution, img_dir, ranking_sets, device=None, batch_size=32,
                          n_workers=0, skipped=None):
    """:func:`validation_ranking` of the refined ``model``'s embedding and of the pretrained ``backbone``'s.

    The pretrained network runs at its own input size, as step 3 would run it without refinement.

    Returns
    -------
    dict
        ``{'refined': {...}, 'pretrained': {...}}``, each as :func:`validation_ranking`.
    """
    spec = backbones.get_backbone(backbone)
    refined = Embedder(model.embedding_net(), backbones.eval_transform(spec, input_resolution), "refined", backbone,
                       input_resolution, dim=model.embedding_dim, device=device)
    pretrained = Embedder(backbones.create_model(backbone), backbones.eval_transform(spec), "pretrained", backbone,
                          spec.input_size, device=device)
    return {name: validation_ranking(net, img_dir, ranking_sets, batch_size, n_workers, skipped)
            for name, net in (("refined", refined), ("pretrained", pretrained))}


def pretrained_ranks_better(comparison):
    """Whether the pretrained network ranks the validation sets strictly better: higher top-1, then lower mean rank
    (the order 5_evaluate.py chooses rankers by)."""
    refined, pretrained = comparison["refined"], comparison["pretrained"]
    return (-pretrained["top1"], pretrained["mean_rank"]) < (-refined["top1"], refined["mean_rank"])
