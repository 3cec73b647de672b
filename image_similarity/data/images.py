"""The one image reader, the folder walker and the record of skipped files.

Every entry point (scripts, API, service) reads images through :func:`read_image` or :func:`load_image`,
so a CMYK, 16-bit, palette or rotated file looks the same everywhere, and a bad file is named once.
"""
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .fileio import atomic_write_text

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageReadError", "read_image", "load_image", "shorter_side",
           "list_images", "image_key", "SkippedImages"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow's own bomb limit warns at 89 MP and errors at twice that; we refuse at the warning level.
MAX_IMAGE_PIXELS = 89_478_485
HIDDEN_NAMES = frozenset({"thumbs.db", "desktop.ini"})


class ImageReadError(ValueError):
    """An image that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_rgb(img):
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is always 16-bit (a dark one must stay dark); only plain "I" has to be guessed from its values.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8), "L")
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


def read_image(source, max_pixels=MAX_IMAGE_PIXELS):
    """Decode an image to upright 8-bit RGB.

    Parameters
    ----------
    source : str, Path, file-like, PIL.Image.Image or ndarray of shape (H, W) or (H, W, 3|4), uint8
        What to read. Paths are decoded by content, not by extension.
    max_pixels : int
        Larger images are refused as decompression bombs.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, EXIF orientation applied, fully loaded (the file is closed).

    Raises
    ------
    ImageReadError
        With the path and the reason: missing, empty, not an image, truncated, or too large.
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
            with Image.open(source) as img:
                n_pixels = img.width * img.height
                if n_pixels > max_pixels:
                    raise ImageReadError(name, f"{img.width}x{img.height} is over the {max_pixels:,}-pixel limit "
                                               "(possible decompression bomb)")
                img.seek(0)  # first frame of animations
                img.load()
                rgb = _to_rgb(ImageOps.exif_transpose(img))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(name, f"possible decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # Truncated data surfaces as OSError ("image file is truncated"), broken headers as SyntaxError.
        raise ImageReadError(name, f"corrupt or truncated image: {err}") from None
    return _with_pixels(rgb, name)


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
        with Image.open(path) as img:
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

    def summary(self, limit=10):
        """One line naming the skipped files, or '' when none were."""
        if not self.items:
            return ""
        names = list(self.items)
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f"skipped {len(names)} unreadable file(s): {', '.join(names[:limit])}{more}"

    def save(self, path):
        """Write ``path<TAB>reason`` rows atomically (a header row even when nothing was skipped)."""
        atomic_write_text(path, "path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in sorted(self.items.items())))
