"""A generated corpus of bad and unusual image files, laced into a dataset folder.

Nothing here is committed as a binary: every file is made by Pillow (or plain bytes) when a test asks for it.
"""
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# The pixels every valid odd-format file holds, so a test can check what the reader returns.
REFERENCE = np.zeros((24, 32, 3), np.uint8)
REFERENCE[:12, :16] = (220, 40, 40)   # top-left red: orientation shows where it ends up
REFERENCE[:12, 16:] = (40, 200, 40)
REFERENCE[12:, :] = (40, 40, 210)

# Pillow's transpose that turns the upright image into what a camera with EXIF tag n stores.
_STORED_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass
class Corpus:
    """What was planted: file paths by expected outcome, relative to the dataset root."""

    root: Path
    bad: dict = field(default_factory=dict)       # key -> why it must be skipped
    odd_valid: dict = field(default_factory=dict)  # key -> expected RGB array (None: only decodes)
    ignored: list = field(default_factory=list)    # never images: hidden files, links leaving the root
    empty_labels: list = field(default_factory=list)

    @property
    def n_cases(self):
        return len(self.bad) + len(self.odd_valid) + len(self.ignored) + len(self.empty_labels)


def _jpeg_bytes(img, **kw):
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95, subsampling=0, **kw)
    return buffer.getvalue()


def _png_bytes(img):
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def lace_with_bad_inputs(root, label, outside_dir):
    """Add the corpus to ``root/<label>/`` (plus two extra label folders) and return a :class:`Corpus`.

    Parameters
    ----------
    root : Path
        A dataset folder (``data/<name>``) that already holds good images.
    label : str
        An existing label folder that receives the mixed files.
    outside_dir : Path
        A folder outside ``root`` where a symlink's target is placed.
    """
    root, folder = Path(root), Path(root) / label
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(root=root)
    upright = Image.fromarray(REFERENCE)

    def put(name, data, outcome, expected=None, reason=""):
        path = folder / name
        path.write_bytes(data)
        key = path.relative_to(root).as_posix()
        if outcome == "bad":
            corpus.bad[key] = reason
        else:
            corpus.odd_valid[key] = expected
        return path

    # Broken files
    good_jpeg, good_png = _jpeg_bytes(upright), _png_bytes(upright)
    put("zero_bytes.jpg", b"", "bad", reason="empty")
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "bad", reason="truncated")
    put("truncated.png", good_png[: len(good_png) // 2], "bad", reason="truncated")
    put("random_bytes.jpg", np.random.default_rng(0).bytes(4096), "bad", reason="not an image")
    put("text_file.png", b"this is a note, not a picture\n" * 20, "bad", reason="not an image")
    put("saved_page.jpg", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>", "bad",
        reason="not an image")
    bomb = Image.new("1", (20_000, 20_000))  # 400 MP: over Pillow's hard limit, yet a tiny file
    put("huge_20000x20000.png", _png_bytes(bomb), "bad", reason="decompression bomb")
    put("bomb_12000x12000.png", _png_bytes(Image.new("1", (12_000, 12_000))), "bad", reason="decompression bomb")
    # Formats outside the allow-list, refused before decoding whatever their name (Pillow would run Ghostscript on EPS)
    buffer = io.BytesIO()
    upright.save(buffer, "EPS")
    put("vector_drawing.jpg", buffer.getvalue(), "bad", reason="format EPS is not accepted")
    buffer = io.BytesIO()
    upright.save(buffer, "ICO")
    put("favicon.png", buffer.getvalue(), "bad", reason="format ICO is not accepted")

    # Unusual formats with valid content (tolerances in the tests absorb JPEG loss)
    put("cmyk.jpg", _jpeg_bytes(upright.convert("CMYK")), "ok", REFERENCE)
    sixteen = Image.fromarray(np.asarray(upright.convert("L"), np.uint16) * 257)  # mode I;16
    put("sixteen_bit.png", _png_bytes(sixteen), "ok", np.repeat(np.asarray(upright.convert("L"))[..., None], 3, 2))
    palette = upright.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((0, 23))  # the blue band's index becomes transparent
    expected_palette = REFERENCE.copy()
    expected_palette[12:] = 255
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=palette.info["transparency"])
    put("palette_transparent.png", buffer.getvalue(), "ok", expected_palette)
    put("grayscale.jpg", _jpeg_bytes(upright.convert("L")), "ok",
        np.repeat(np.asarray(upright.convert("L"))[..., None], 3, 2))
    la = upright.convert("LA")
    put("gray_alpha.png", _png_bytes(la), "ok", np.repeat(np.asarray(upright.convert("L"))[..., None], 3, 2))
    frames = [upright, Image.fromarray(255 - REFERENCE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", buffer.getvalue(), "ok", REFERENCE)
    buffer = io.BytesIO()
    upright.save(buffer, "WEBP", lossless=True)
    put("lossless.WEBP", buffer.getvalue(), "ok", REFERENCE)

    # Odd geometry and metadata
    for tag, transpose in _STORED_FOR_ORIENTATION.items():
        stored = upright.transpose(transpose) if transpose is not None else upright
        exif = Image.Exif()
        exif[0x0112] = tag
        put(f"exif_orientation_{tag}.jpg", _jpeg_bytes(stored, exif=exif.tobytes()), "ok", REFERENCE)
    put("one_pixel.png", _png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))), "ok",
        np.array([[[10, 20, 30]]], np.uint8))
    put("ünïcödé_画像_photo.jpg", good_jpeg, "ok", REFERENCE)
    put("long_" + "x" * 200 + ".jpg", good_jpeg, "ok", REFERENCE)

    # Layout
    outside_dir = Path(outside_dir)
    outside_dir.mkdir(parents=True, exist_ok=True)
    (outside_dir / "secret.jpg").write_bytes(good_jpeg)
    os.symlink(outside_dir / "secret.jpg", folder / "link_outside.jpg")
    corpus.ignored.append(f"{label}/link_outside.jpg")
    (root / "empty_label").mkdir(exist_ok=True)
    corpus.empty_labels.append("empty_label")
    only_bad = root / "only_bad_label"
    only_bad.mkdir(exist_ok=True)
    (only_bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    corpus.bad["only_bad_label/broken.jpg"] = "corrupt"
    corpus.empty_labels.append("only_bad_label")
    for hidden in (".DS_Store", "Thumbs.db", "._apple_double.jpg"):
        (folder / hidden).write_bytes(b"\x00\x01hidden metadata")
        corpus.ignored.append(f"{label}/{hidden}")
    return corpus
