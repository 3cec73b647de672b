"""The embedder: one network with its preprocessing and identity, and the only forward loop over images.

An :class:`Embedder` is made by :func:`load_embedder` (a registry name or a refined checkpoint, with one
:class:`.inference.InferenceConfig`) or, for features already on disk, by :func:`resolve_embedder`, which finds the
network that made them and refuses any other. Its preprocessing is its :class:`.backbones.DataConfig`'s eval transform.

Every forward pass in the package goes through :meth:`Network.forward_batch`, on a prepared float32 NCHW batch: an
inference engine (OpenVINO or ONNX Runtime, :mod:`.engines`, chosen by the config's ``backend``) replaces that one
method. Images reach it through one loop, :meth:`Network.iter_batches` (step 2 runs its classifier through a plain
:class:`Network`, which has no identity): DataLoader workers decode and resize through :func:`images.load_image` and send uint8
pixels (:class:`ImageDataset`), :func:`collate_good_bad` splits every batch into readable and unreadable images, and
each batch is normalised in this process just before the forward pass. A bad image is named and counted once; a
batch in which every image is bad is simply empty.
"""
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import backbones, engines
from .checkpoints import load_checkpoint
from .inference import InferenceConfig, default_device, set_thread_count
from ..data.images import SkippedImages, image_key, load_image

__all__ = ["Network", "Embedder", "load_embedder", "resolve_embedder", "ImageDataset", "collate_good_bad"]

logger = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images as ``(index, tensor or None, reason or None)``; an unreadable image gives ``None`` and the reason.

    Parameters
    ----------
    sources : list
        Image files, PIL images or uint8 arrays (anything :func:`images.load_image` reads).
    transform : callable
        PIL RGB image -> tensor of shape (3, r, r), e.g. ``EvalTransform.to_uint8``.
    """

    def __init__(self, sources, transform):
        self.sources = list(sources)
        self.transform = transform

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        local = SkippedImages()  # workers are separate processes: the reason travels back with the item
        image = load_image(self.sources[index], local)
        if image is None:
            return index, None, next(iter(local))[1]
        return index, self.transform(image), None


def collate_good_bad(items):
    """``(indices, batch, bad)``: the readable images stacked, the bad ones as ``(index, reason)``.

    ``batch`` is None when every image of the batch is bad.
    """
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


class Network:
    """A network with its preprocessing, run over images: the one forward pass and the one loop over images.

    Parameters
    ----------
    net : torch.nn.Module
        Maps a (N, 3, r, r) float32 batch to (N, dim) outputs.
    data_config : backbones.DataConfig
        How its inputs must look; ``transform`` is its eval transform (``EvalTransform``: PIL RGB image ->
        normalised (3, r, r) float32, in two halves, ``to_uint8`` and ``normalize``).
    dim : int, optional
        Output length; default ``net.num_features``.
    device : str or torch.device, optional
        Default CUDA when available (mixed precision, pinned memory), else CPU (channels-last).
    """

    def __init__(self, net, data_config, dim=None, device=None):
        self.device = default_device(device)
        net = net.to(self.device).eval()
        self.net = net if self.device.type == "cuda" else net.to(memory_format=torch.channels_last)
        self.data_config = data_config
        self.transform = data_config.eval_transform()
        self.dim = int(net.num_features if dim is None else dim)
        self.engine = None  # an engines.Engine running the forward pass instead of PyTorch (Embedder.use_engine)

    @property
    def input_resolution(self):
        """Input width and height in pixels (``data_config.input_size``)."""
        return self.data_config.input_size

    def forward_batch(self, batch):
        """The forward pass: one prepared batch to its outputs.

        Parameters
        ----------
        batch : float32 tensor of shape (n, 3, r, r)
            Normalised by ``transform`` (on any device).

        Returns
        -------
        ndarray of shape (n, dim), float32
        """
        if self.engine is not None:
            return self.engine(batch.cpu())
        with torch.inference_mode():
            if self.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    out = self.net(batch.to(self.device, non_blocking=True))
            else:
                out = self.net(batch.to(self.device).contiguous(memory_format=torch.channels_last))
            return out.float().cpu().numpy()

    def iter_batches(self, sources, batch_size=64, n_workers=2, skipped=None, names=None, desc="featurize",
                     progress=None, summarize=None):
        """Yield ``(indices, rows)`` batch by batch, in the order of ``sources``, skipping unreadable images.

        Parameters
        ----------
        sources : list
            Image files, PIL images or uint8 arrays.
        batch_size : int
            Images per forward pass.
        n_workers : int
            DataLoader worker processes decoding images (0 = in this process).
        skipped : SkippedImages, optional
            Receives every unreadable image with its reason, named by ``names`` (default: the source itself).
        names : list of str, optional
            One name per source for ``skipped``.
        desc : str
            Progress-bar label.
        progress : bool or None
            None: a bar only on a terminal.
        summarize : callable, optional
            Maps each batch of network-sized uint8 pixels, (n, 3, r, r), to an (n, k) array (e.g.
            ``colour.colour_histograms``), yielded as a third item.

        Yields
        ------
        (list of int, ndarray of shape (n, dim), float32)
            Positions in ``sources`` and their outputs (and ``summarize(pixels)`` when given).
        """
        sources = list(sources)
        n_batches = -(-len(sources) // batch_size)
        cuda = self.device.type == "cuda"
        # An own generator: iterating must not draw from the global RNG (step 2 interleaves this with training).
        loader = DataLoader(ImageDataset(sources, self.transform.to_uint8), batch_size=batch_size, shuffle=False,
                            num_workers=min(n_workers, n_batches), collate_fn=collate_good_bad, pin_memory=cuda,
                            generator=torch.Generator().manual_seed(0))
        with tqdm(total=len(sources), unit="img", desc=desc, leave=False,
                  disable=None if progress is None else not progress) as bar:
            for indices, batch, bad in loader:
                for i, reason in bad:
                    if skipped is not None:
                        skipped.add(sources[i] if names is None else names[i], reason)
                bar.update(len(indices) + len(bad))
                if batch is None:
                    continue
                rows = self.forward_batch(self.transform.normalize(batch.to(self.device, non_blocking=True)))
                yield (indices, rows) if summarize is None else (indices, rows, summarize(batch.numpy()))

    def iter_files(self, paths, root, batch_size=64, n_workers=2, skipped=None):
        """Yield ``(keys, rows)`` for image files, batch by batch, in the order of ``paths``.

        Keys are the paths relative to ``root``, with forward slashes; other parameters as :meth:`iter_batches`.
        """
        paths = [Path(p) for p in paths]
        keys = [image_key(p, root) for p in paths]
        n_good = 0
        for indices, rows in self.iter_batches(paths, batch_size, n_workers, skipped):
            n_good += len(indices)
            yield [keys[i] for i in indices], rows
        logger.info("featurized %d of %d images with %r (%d skipped)", n_good, len(paths), self, len(paths) - n_good)

    def embed_files(self, paths, root, batch_size=64, n_workers=2, skipped=None):
        """Embed image files in memory.

        Returns
        -------
        keys : list of str
            One per readable image, in the order of ``paths``, relative to ``root``.
        matrix : ndarray of shape (len(keys), dim), float32
        """
        matrix = np.empty((len(paths), self.dim), np.float32)
        keys = []
        for batch_keys, rows in self.iter_files(paths, root, batch_size, n_workers, skipped):
            matrix[len(keys):len(keys) + len(rows)] = rows
            keys.extend(batch_keys)
        return keys, (matrix if len(keys) == len(paths) else matrix[:len(keys)].copy())

    def embed_images(self, images, batch_size=64, skipped=None, names=None):
        """Embed images in memory (PIL images, uint8 arrays or files), in this process.

        Returns
        -------
        ndarray of shape (len(images), dim), float32
            NaN rows for the images that could not be used (recorded in ``skipped`` under ``names``).
        """
        out = np.full((len(images), self.dim), np.nan, np.float32)
        for indices, rows in self.iter_batches(images, batch_size, 0, skipped, names, desc="embed"):
            out[indices] = rows
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.input_resolution} px, dim {self.dim}, {self.device})"


class Embedder(Network):
    """A :class:`Network` mapping images to feature vectors, with what identifies it.

    Parameters
    ----------
    net : torch.nn.Module
        Maps a (N, 3, r, r) float32 batch to (N, dim) outputs.
    data_config : backbones.DataConfig
        Its preprocessing (the backbone entry's, or the one stored in its checkpoint).
    model_id : str
        ``backbones.model_id`` of the network: ``"pretrained:<name>"`` or ``"sha256:<16 hex>"``.
    backbone : str
        Registry name of the architecture.
    dim, device
        As :class:`Network`.
    checkpoint : str or Path, optional
        The refined checkpoint the network came from.
    """

    def __init__(self, net, data_config, model_id, backbone, dim=None, device=None, checkpoint=None):
        super().__init__(net, data_config, dim, device)
        self.model_id, self.backbone = model_id, backbone
        self.checkpoint = None if checkpoint is None else str(checkpoint)

    def use_engine(self, inference, cache_dir=None):
        """Run as ``inference`` (an :class:`.inference.InferenceConfig`) says: its CPU thread count, and the forward
        pass on its inference engine (:func:`.engines.load_engine`); returns self.

        The network is exported beside its checkpoint, or for a pretrained backbone in ``cache_dir`` (default
        :func:`.engines.default_cache_dir`). ``backend="torch"``, or an engine that cannot be used (said in one log
        line), leaves PyTorch.
        """
        threads = set_thread_count(inference.threads)
        path = engines.export_path_for(self.model_id, self.input_resolution, self.checkpoint, cache_dir)
        self.engine = engines.load_engine(self.net, self.model_id, self.data_config, path, inference, threads)
        return self

    @property
    def info(self):
        """``model_id``, ``backbone``, ``dim``, ``input_resolution`` (and ``checkpoint`` when refined), plain values."""
        info = {"model_id": self.model_id, "backbone": self.backbone, "dim": self.dim,
                "input_resolution": self.input_resolution}
        return info if self.checkpoint is None else {**info, "checkpoint": self.checkpoint}

    @property
    def runs_on(self):
        """What runs the forward pass: ``"PyTorch"`` or the engine and its precision, e.g. ``"openvino f32"``."""
        return "PyTorch" if self.engine is None else f"{self.engine.name} {self.engine.precision}"

    def __repr__(self):
        return (f"Embedder({self.model_id}, {self.backbone}, {self.input_resolution} px, dim {self.dim}, "
                f"{self.device}, {self.runs_on})")


def load_embedder(model, inference=None):
    """The :class:`Embedder` of a registry name (pretrained weights) or a refined checkpoint path.

    Parameters
    ----------
    model : str or Path
        A backbone name (its entry's data config) or a checkpoint (the data config stored in it).
    inference : inference.InferenceConfig, optional
        Device, CPU threads and inference engine (:meth:`Embedder.use_engine`); default ``InferenceConfig()``.

    Raises
    ------
    ValueError
        When ``model`` is neither a backbone name nor an existing checkpoint, or the file is not a checkpoint.
    """
    inference = inference or InferenceConfig()
    if isinstance(model, str) and model in backbones.list_backbones():
        embedder = Embedder(backbones.create_model(model), backbones.get_backbone(model).data_config(),
                            backbones.model_id(model), model, device=inference.device)
    else:
        backbones.model_id(model)  # a clear error when it is neither a name nor a file
        classifier, ckpt = load_checkpoint(model)
        embedder = Embedder(classifier.embedding_net(), ckpt["data_config"], ckpt["model_id"], ckpt["backbone"],
                            device=inference.device, checkpoint=model)
    return embedder.use_engine(inference)


def resolve_embedder(model_id, backbone, checkpoint, features_path="the features", inference=None):
    """The network that made features of ``model_id``: the pretrained ``backbone`` or the ``checkpoint``.

    Parameters
    ----------
    model_id : str
        The features' ``model_id`` (their sidecar).
    backbone : str
        The pretrained candidate (registry name).
    checkpoint : str or Path
        The refined candidate (may be missing).
    features_path : str or Path
        Named in the error.
    inference : inference.InferenceConfig, optional
        As :func:`load_embedder`.

    Raises
    ------
    ValueError
        When neither candidate is that network (one message: which features, which networks, what to run).
    """
    if model_id == backbones.model_id(backbone):
        return load_embedder(backbone, inference)
    found = backbones.model_id(checkpoint) if Path(checkpoint).is_file() else f"missing ({checkpoint})"
    if found == model_id:
        return load_embedder(checkpoint, inference)
    raise ValueError(f"{features_path} holds features of {model_id}, made by neither the pretrained {backbone} nor "
                     f"the refined network ({found}): run 3_featurizeImages.py again")
