"""The one image reader, the folder walker and the record of skipped files.

Every entry point (scripts, API, service) reads images through :func:`read_image` or :func:`load_image`,
so a CMYK, 16-bit, palette or rotated file looks the same everywhere, and a bad file is named once.
"""
import logging
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fileio import atomic_write_text

__all__ = ["IMAGE_EXTENSIONS", "ACCEPTED_FORMATS", "MAX_IMAGE_PIXELS", "MAX_DECODE_BYTES", "ImageReadError",
           "decode_bytes", "read_image", "load_image", "shorter_side", "list_images", "image_key", "SkippedImages"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# The formats Pillow may decode, named by Pillow's plugin IDs and checked before any decoding: EPS (which runs
# Ghostscript), PDF, PSD, ICO, and the rest of Pillow's plugins are refused. (Cameras' multi-picture JPEGs open
# through the JPEG plugin, as format MPO.)
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
# Pillow's own bomb limit warns at 89 MP and errors at twice that; we refuse at the warning level.
MAX_IMAGE_PIXELS = 89_478_485
# Most memory one decode may take, estimated from the header (decode_bytes: at most 16 bytes a pixel), so every mode
# passes at MAX_IMAGE_PIXELS; callers facing strangers (uploads, downloads) pass lower limits.
# bench/decode_memory.py measures the real peaks against the estimate.
MAX_DECODE_BYTES = 1_500_000_000
HIDDEN_NAMES = frozenset({"thumbs.db", "desktop.ini"})
# Bytes per pixel Pillow holds for a decoded mode (1-bit and 8-bit modes use a byte, 16-bit two, the rest four).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_BYTES = 4  # Pillow stores RGB as 4 bytes per pixel
_CHUNK = 1 << 20  # pixels scaled at a time when wide modes are brought to 8 bits


def decode_bytes(mode, width, height):
    """Upper estimate of the memory :func:`read_image` needs for an image, in bytes.

    The decoded image, one more copy of it while orientation or a mode conversion runs, and two RGB images
    (the conversion's result and the composited or rotated output).

    Parameters
    ----------
    mode : str
        The Pillow mode the file decodes to (``img.mode`` after ``Image.open``).
    width, height : int
        In pixels.
    """
    return width * height * (2 * _MODE_BYTES.get(mode, 4) + 2 * _RGB_BYTES)


class ImageReadError(ValueError):
    """An image that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _wide_to_l(img):
    """An 8-bit ``L`` image from a 16-bit, 32-bit integer or float grey one, scaled rather than clipped.

    Works in chunks of :data:`_CHUNK` pixels, so the only full-size copies are Pillow's array export and the
    8-bit result (no float64 image: a 9,400 x 9,400 16-bit PNG once took 2.4 GB here).
    """
    arr = np.asarray(img).reshape(-1)
    if img.mode.startswith("I;16"):
        # Always 16-bit (a dark one must stay dark): the high byte.
        shift, top, scale = 8, 65535, None
    elif img.mode == "I":
        # Plain 32-bit integers: guessed from the values (16-bit data, or already 0..255).
        shift, top, scale = (8, 65535, None) if arr.max(initial=0) > 255 else (0, 255, None)
    else:  # "F": 0..1 floats are scaled, larger values taken as 0..255
        shift, top, scale = 0, 255, 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
    out = np.empty(arr.size, np.uint8)
    for start in range(0, arr.size, _CHUNK):
        chunk = arr[start:start + _CHUNK]
        if scale is not None:
            chunk = np.nan_to_num(chunk * np.float32(scale), nan=0.0)
            out[start:start + _CHUNK] = np.clip(chunk + 0.5, 0, top)
        else:
            out[start:start + _CHUNK] = np.clip(chunk, 0, top) >> shift
    del arr
    return Image.fromarray(out.reshape(img.height, img.width), "L")


def _to_rgb(img):
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK (with Pillow's inversion handling), L, 1, YCbCr, LAB, HSV
    return img


def read_image(source, max_pixels=MAX_IMAGE_PIXELS, max_bytes=MAX_DECODE_BYTES):
    """Decode an image to upright 8-bit RGB.

    The format and the size are checked from the header before anything is decoded.

    Parameters
    ----------
    source : str, Path, file-like, PIL.Image.Image or ndarray of shape (H, W) or (H, W, 3|4), uint8
        What to read. Paths are decoded by content, not by extension.
    max_pixels : int
        Larger images are refused as decompression bombs.
    max_bytes : int
        Images whose decoding would need more memory than this (bytes, :func:`decode_bytes`) are refused.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, EXIF orientation applied, fully loaded (the file is closed).

    Raises
    ------
    ImageReadError
        With the path and the reason: missing, empty, not an image, a format not in :data:`ACCEPTED_FORMATS`,
        truncated, or too large.
    """
    if isinstance(source, np.ndarray):
        try:
            rgb = _to_rgb(Image.fromarray(source))
        except (TypeError, ValueError) as err:
            raise ImageReadError("<array>", f"not an image array ({source.shape}, {source.dtype}): {err}") from None
        return _with_pixels(rgb, "<array>")
    if isinstance(source, Image.Image):
        return _with_pixels(_to_rgb(ImageOps.exif_transpose(source)), "<image>")
    # A Path's .name is only its last component: name paths in full, file objects by their .name.
    name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None) or "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageReadError(path, "file not found" if not path.exists() else "not a regular file")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=ACCEPTED_FORMATS) as img:
                _check_header(img, name, max_pixels, max_bytes)
                img.seek(0)  # first frame of animations
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                rgb = _to_rgb(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        refused = _refused_format(source)
        if refused:
            raise ImageReadError(name, f"format {refused} is not accepted (accepted: {', '.join(ACCEPTED_FORMATS)})") \
                from None
        raise ImageReadError(name, "not an image Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(name, f"possible decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Truncated data surfaces as OSError ("image file is truncated"), broken headers as SyntaxError.
        raise ImageReadError(name, f"corrupt or truncated image: {err}") from None
    return _with_pixels(rgb, name)


def _refused_format(source):
    """The name of the Pillow format whose signature the first bytes of ``source`` carry, or None.

    Only the signature checks run (nothing is parsed), so a refused format's plugin never sees the data.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as handle:
            prefix = handle.read(16)
    else:
        source.seek(0)
        prefix = source.read(16)
    Image.init()
    for format_id in Image.ID:
        accept = Image.OPEN[format_id][1]
        if format_id in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return format_id
        except (struct.error, IndexError, ValueError):  # a few checks assume 4 or more bytes
            continue
    return None


def _check_header(img, name, max_pixels, max_bytes):
    """Raise ImageReadError when an opened, not yet decoded image is too large."""
    if img.width * img.height > max_pixels:
        raise ImageReadError(name, f"{img.width}x{img.height} is over the {max_pixels:,}-pixel limit "
                                   "(possible decompression bomb)")
    needed = decode_bytes(img.mode, img.width, img.height)
    if needed > max_bytes:
        raise ImageReadError(name, f"{img.width}x{img.height} {img.mode} needs about {needed:,} bytes to decode, over "
                                   f"the {max_bytes:,}-byte limit")


def _with_pixels(rgb, name):
    """``rgb``, or ImageReadError when it is 0 pixels wide or high (resizing it would divide by zero)."""
    if rgb.width == 0 or rgb.height == 0:
        raise ImageReadError(name, f"no pixels ({rgb.width}x{rgb.height})")
    return rgb


def load_image(source, skipped=None) -> Optional[Image.Image]:
    """Like :func:`read_image`, but log and record a bad image and return None instead of raising."""
    try:
        return read_image(source)
    except ImageReadError as err:
        logger.warning("skipping %s", err)
        if skipped is not None:
            skipped.add(err.path, err.reason)
        return None


def shorter_side(path) -> Optional[int]:
    """The shorter side of the image at ``path`` in pixels, from its header alone (nothing is decoded); None when
    Pillow cannot open it (:func:`read_image` names the reason when the image is used)."""
    try:
        with Image.open(path, formats=ACCEPTED_FORMATS) as img:
            return min(img.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def image_key(path, root):
    """The key of an image: its path relative to the image folder with forward slashes ('label/file.jpg')."""
    return Path(path).relative_to(root).as_posix()


def _is_hidden(name):
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


def list_images(root, recursive=True, skipped=None):
    """Image files under ``root``, sorted, by extension (any case); hidden files and folders are ignored.

    A symlink that resolves outside ``root`` is recorded as skipped, never followed.

    Returns
    -------
    list of Path
    """
    root = Path(root)
    real_root = root.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d)) if recursive else []
        for name in sorted(filenames):
            if _is_hidden(name) or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                target = path.resolve()
                if real_root not in target.parents:
                    logger.warning("skipping %s: symlink points outside %s", path, root)
                    if skipped is not None:
                        skipped.add(path, f"symlink points outside {root}")
                    continue
            found.append(path)
    return sorted(found)


@dataclass
class SkippedImages:
    """Files that were skipped, with the reason, reported once each and saved as a TSV."""

    items: dict = field(default_factory=dict)

    def add(self, path, reason):
        self.items.setdefault(str(path), reason)

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items.items())

    def summary(self, limit=20):
        """One line naming the skipped files, or '' when none were."""
        if not self.items:
            return ""
        names = list(self.items)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f"skipped {len(names)} unreadable file(s): {', '.join(names[:limit])}{more}"

    def save(self, path):
        """Write ``path<TAB>reason`` rows atomically (a header row even when nothing was skipped)."""
        atomic_write_text(path, "path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in sorted(self.items.items())))
