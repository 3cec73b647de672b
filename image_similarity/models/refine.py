"""Refine (fine-tune) a pretrained backbone as an image classifier: the tutorial's step 2.

The backbone plus a dropout + classification head (:class:`.heads.ImageClassifier`: the tutorial's linear layer
or a normalised-softmax cosine classifier) is trained with SGD and momentum on the training split, with the
training augmentation of the config's data config (optionally random-resized-crop), a step or cosine learning-rate
schedule and optionally a lower learning rate for the backbone than for the head. After every epoch it is evaluated
on the validation split and the epoch with the best validation accuracy (ties: the lower validation loss) is kept.
The settings and the "auto" resolution rule live in :mod:`.refine_config`; :mod:`.refine_compare` then ranks the
validation ranking sets with the refined and the pretrained embedding. The test split is never seen here.

After every epoch a resume checkpoint (:mod:`.refine_resume`: weights, optimizer, best-so-far weights, log rows and
every random state) is written atomically, so an interrupted run continues with ``fine_tune(..., resume=True)``. On CPU with
``n_workers=0``, the same seed and the same torch thread count (float sums may be split differently across another
number of threads), a resumed run ends with exactly the weights of an uninterrupted one: each epoch's sample order
and DataLoader seed are derived from ``(seed, epoch)`` and the global RNG states (dropout, augmentation) are saved
and restored.

Speed: inputs and weights use the channels-last memory format (faster convolutions on CPU and GPU), CPU runs use
every available core (the caller applies ``inference.set_thread_count``), images are decoded in DataLoader worker processes, and on CUDA the forward pass runs under
mixed precision (``torch.autocast`` + ``GradScaler``) from pinned memory.
"""
import copy
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import backbones, engines
from .embedder import ImageDataset, Network, collate_good_bad
from .heads import ImageClassifier
from .inference import default_device
from .refine_resume import (data_signature, load_resume_checkpoint, restore_rng_states,
                            save_resume_checkpoint)
from ..data.fileio import remove_stale_temporaries

__all__ = ["checkpoint_activations", "RefineResult", "LOG_COLUMNS", "LabelledImages", "lr_for_epoch", "epoch_indices", "make_loader",
           "train_one_epoch", "evaluate", "fine_tune"]

logger = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_err", "val_loss", "val_err", "seconds")


@dataclass
class RefineResult:
    """What :func:`fine_tune` returns.

    Attributes
    ----------
    model : heads.ImageClassifier
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


def checkpoint_activations(backbone, probe_px=64):
    """Make a timm ``backbone`` recompute its activations in the backward pass instead of holding them.

    A training step then holds about half the memory for a little more time (bench/refine_memory.py). The batch norms
    inside the recomputed blocks run twice per step, and each run would update their running statistics; their
    momentum ``m`` becomes ``1 - sqrt(1 - m)``, so that the two updates with the same batch's statistics equal one
    update with ``m`` and the trained weights and statistics stay those of a plain step. Which batch norms are
    recomputed is found by one step of a copy on a ``probe_px`` square batch.
    """
    backbone.set_grad_checkpointing(True)
    probe = copy.deepcopy(backbone).train()
    calls = Counter()
    for name, module in probe.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # Before its forward: a recomputation may stop inside a module's forward (once it has what the backward
            # needs), after the statistics were updated but before a forward hook would run.
            module.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
    probe(torch.zeros(2, 3, probe_px, probe_px)).sum().backward()
    for name, module in backbone.named_modules():
        if calls[name] == 2 and module.momentum is not None:
            module.momentum = 1.0 - math.sqrt(1.0 - module.momentum)
    return backbone


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
    model : heads.ImageClassifier
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


def evaluate(model, data_config, dataset, batch_size, n_workers, device, skipped=None, desc="val", progress=True):
    """Mean cross-entropy per image, error rate in [0, 1] and image count of ``model`` over ``dataset``.

    The forward passes are an :class:`embedder.Network`'s (``data_config``'s eval transform), with the classifier's
    logits as outputs; ``dataset`` is a :class:`LabelledImages` (its sources and labels are used). NaN loss and
    error when no image is readable.
    """
    model.eval()
    net = Network(model, data_config, dim=model.n_classes, device=device)
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


def _is_better(row, best):
    """Higher validation accuracy wins, then lower validation loss; without validation the latest epoch wins."""
    if best is None or math.isnan(row["val_err"]):
        return True
    return (row["val_err"], row["val_loss"]) < (best["val_err"], best["val_loss"])


# ---------------------------------------------------------------- the run

def fine_tune(config, train_items, val_items, img_dir, classes, device=None, checkpoint_path=None, resume=False,
              skipped=None, progress=True):
    """Train :class:`.heads.ImageClassifier` on ``train_items`` and keep the best epoch on ``val_items``.

    Parameters
    ----------
    config : refine_config.RefineConfig
        Its ``data_config`` gives the training augmentation and the validation transform.
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
    device = default_device(device)
    if not train_items:
        raise ValueError("no training images: the train split is empty")
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"refinement needs at least 2 labels, got {n_classes}: {list(classes)}")
    bad_ids = sorted({y for _, y in [*train_items, *val_items] if not 0 <= y < n_classes})
    if bad_ids:
        raise ValueError(f"label ids {bad_ids} are outside 0..{n_classes - 1} ({n_classes} classes)")
    signature = data_signature(classes, train_items, val_items)
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
    backbone = backbones.create_model(config.backbone, pretrained=state is None)
    model = ImageClassifier(backbone, n_classes, config.dropout, config.head, config.temperature, config.embedding_dim)
    if config.freeze_backbone:
        model.backbone.requires_grad_(False)
    elif config.activation_checkpointing:
        checkpoint_activations(model.backbone)
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
        restore_rng_states(state["rng"])
        logger.info("resuming %s after epoch %d of %d", checkpoint_path, start_epoch, config.max_epochs)

    data_config = config.data_config
    train_set = LabelledImages(img_dir, train_items, data_config.train_transform(config.crop_scale))
    val_set = LabelledImages(img_dir, val_items, data_config.eval_transform())
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
        val_loss, val_err, _ = evaluate(model, data_config, val_set, config.batch_size, config.n_workers, device,
                                        skipped=skipped, desc=f"{tag} val", progress=progress)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_err": train_err,
               "val_loss": val_loss, "val_err": val_err, "seconds": time.perf_counter() - epoch_start}
        log_rows.append(row)
        logger.info("%s: lr %g, train loss %.4f err %.3f, val loss %.4f err %.3f, %.1f s", tag, lr, train_loss,
                    train_err, val_loss, val_err, row["seconds"])
        if _is_better(row, best):
            best = {"epoch": epoch + 1, "val_err": val_err, "val_loss": val_loss,
                    "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        if checkpoint_path:
            save_resume_checkpoint(checkpoint_path, epoch + 1, config, signature, model, optimizer, scaler, best,
                                   log_rows)

    if not val_items:
        logger.warning("no validation images: keeping the last epoch's weights")
    model.load_state_dict(best["state_dict"])
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return RefineResult(model=model, best_epoch=best["epoch"], best_val_accuracy=1.0 - best["val_err"],
                        best_val_loss=best["val_loss"], log_rows=log_rows, n_train=n_train, n_val=len(val_items),
                        resumed_after_epoch=state["epoch"] if state else 0,
                        seconds=time.perf_counter() - start_time)
