"""The image reader contract, on images generated here: modes, orientation, formats, bad files, folder walking."""
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image
from image_similarity.data import images
from image_similarity.data.images import ImageReadError, SkippedImages, list_images, load_image, read_image

ORIENTATION_TAG = 0x0112


def _asymmetric():
    """ndarray (24, 40, 3) uint8 of flat blocks: every flip or rotation of it looks different."""
    arr = np.zeros((24, 40, 3), np.uint8)
    arr[:12, :20] = (255, 0, 0)
    arr[:12, 20:] = (0, 255, 0)
    arr[12:, :20] = (0, 0, 255)
    arr[12:, 20:30] = (255, 255, 0)
    arr[12:, 30:] = (255, 255, 255)
    return arr


# What the camera stored for each EXIF orientation, given the upright picture (EXIF 2.3, tag 0x0112):
# 6 = "rotate 90 clockwise to view", so it stored the picture turned 90 counter-clockwise; 5 and 7 are mirrored.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_comes_out_upright(tmp_path, orientation, fmt):
    upright = _asymmetric()
    stored = Image.fromarray(np.ascontiguousarray(STORED[orientation](upright)))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    stored.save(path, format=fmt, exif=exif, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))
    result = np.asarray(read_image(path), dtype=int)
    assert result.shape == upright.shape
    assert np.abs(result - upright).mean() < 4  # JPEG blurs the block edges a little


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.mode == "RGB" and np.abs(np.asarray(img, int) - (255, 0, 0)).max() <= 3


def test_palette_and_palette_transparency(tmp_path):
    rgb = _asymmetric()
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "p.png")), rgb)

    pal = Image.new("P", (4, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    pal.save(tmp_path / "pt.png", transparency=0)
    pal.save(tmp_path / "pt.gif", transparency=0)
    for name in ("pt.png", "pt.gif"):
        out = np.asarray(read_image(tmp_path / name))
        assert out.shape == (2, 4, 3)
        assert out[0].tolist() == [[255, 255, 255], [200, 100, 50], [255, 255, 255], [200, 100, 50]], name


def test_alpha_is_composited_on_white(tmp_path):
    la = np.array([[[100, 255], [100, 0]]], np.uint8)  # opaque grey, fully transparent grey
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.asarray(read_image(tmp_path / "la.png")).tolist() == [[[100] * 3, [255] * 3]]
    rgba = np.array([[[200, 0, 0, 255], [0, 0, 0, 128], [0, 90, 0, 0]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(read_image(tmp_path / "rgba.png"), int)
    assert out[0, 0].tolist() == [200, 0, 0] and out[0, 2].tolist() == [255, 255, 255]
    assert np.abs(out[0, 1] - 127).max() <= 1  # half-transparent black over white


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 16384, 32768, 65535]], np.uint16)).save(tmp_path / "bright.png")
    assert Image.open(tmp_path / "bright.png").mode.startswith("I")
    assert np.asarray(read_image(tmp_path / "bright.png"))[0, :, 0].tolist() == [0, 64, 128, 255]
    # a dark 16-bit image (nothing above 255 of 65535) stays dark
    Image.fromarray(np.array([[0, 100, 200, 255]], np.uint16)).save(tmp_path / "dark.png")
    assert np.asarray(read_image(tmp_path / "dark.png")).max() <= 1


def test_grayscale_and_inputs_other_than_paths(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = np.asarray(read_image(tmp_path / "g.png"))
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], grey) for c in range(3))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / "g.png"))), out)
    assert np.array_equal(np.asarray(read_image(grey)), out)
    assert np.array_equal(np.asarray(read_image(Image.fromarray(grey))), out)
    assert np.array_equal(np.asarray(read_image(io.BytesIO((tmp_path / "g.png").read_bytes()))), out)
    with pytest.raises(ImageReadError, match="<array>.*not an image array"):
        read_image(np.zeros((2, 2, 7), np.float64))
    with pytest.raises(ImageReadError, match=r"^<array>: no pixels \(5x0\)$"):  # resizing it would divide by zero
        read_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageReadError, match=r"^<image>: no pixels \(0x3\)$"):
        read_image(Image.new("RGB", (0, 3)))


def test_formats_by_content_in_any_letter_case(tmp_path):
    root = tmp_path / "root"
    names = {"a.jpg": "JPEG", "b.JPEG": "JPEG", "c.Png": "PNG", "d.BMP": "BMP", "e.gif": "GIF", "f.WebP": "WEBP",
             "g.tif": "TIFF", "h.TIFF": "TIFF", "sub/i.jpeg": "JPEG", "j_png_named.jpg": "PNG"}
    for name, fmt in names.items():
        make_image(root / name, (40, 90, 160), fmt=fmt)
    (root / "notes.txt").write_text("x")
    (root / "raw.cr2").write_bytes(b"\0" * 10)
    found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == sorted(names)
    for path in found:
        img = read_image(path)
        assert img.mode == "RGB" and img.size == (64, 48)
        assert np.abs(np.asarray(img, int).mean(axis=(0, 1)) - (40, 90, 160)).max() < 8, path
    assert list_images(root, recursive=False) == [p for p in found if p.parent == root]


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    assert read_image(tmp_path / "anim.gif").getpixel((4, 4)) == (255, 0, 0)


def _png_header_only(width, height):
    """A PNG that claims width x height 8-bit RGB pixels but holds no image data (a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])  # over our limit only; over Pillow's own error level too
def test_decompression_bombs_are_refused_cheaply(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path) and "decompression bomb" in info.value.reason
    assert str(path) in str(info.value)


def test_max_pixels_is_honoured(tmp_path):
    path = make_image(tmp_path / "small.png", (1, 2, 3), size=(20, 10))
    assert read_image(path, max_pixels=200).size == (20, 10)
    with pytest.raises(ImageReadError, match=r"small.png: 20x10 is over the 199-pixel limit"):
        read_image(path, max_pixels=199)
    assert images.MAX_IMAGE_PIXELS == 89_478_485


def _grey16_png_header_only(width, height):
    """A PNG that claims width x height 16-bit grey pixels but holds no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decode_budget_in_bytes_is_checked_from_the_header(tmp_path):
    path = tmp_path / "wide16.png"
    path.write_bytes(_grey16_png_header_only(9_400, 9_400))  # under the pixel limit; 2 bytes a pixel
    needed = images.decode_bytes("I;16", 9_400, 9_400)
    # Refused from the header: the file holds no pixel data, so decoding would have said "truncated" instead.
    with pytest.raises(ImageReadError, match=rf"wide16.png: 9400x9400 I;16 needs about {needed:,} bytes to decode, "
                                             r"over the 500,000,000-byte limit"):
        read_image(path, max_bytes=500_000_000)
    # Mode-aware: the same size in 8-bit grey needs less than in 16-bit, and RGB more.
    assert images.decode_bytes("L", 100, 100) < images.decode_bytes("I;16", 100, 100) < \
        images.decode_bytes("RGB", 100, 100)
    # Every mode passes at the pixel limit under the default budget.
    assert images.decode_bytes("RGBA", images.MAX_IMAGE_PIXELS, 1) <= images.MAX_DECODE_BYTES


PEAK_CHILD = """
import re, sys
from image_similarity.data.images import decode_bytes, read_image
def peak():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) * 1024
before = peak()
image = read_image(sys.argv[1])
print(peak() - before, decode_bytes("I;16", image.width, image.height))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_16_bit_decoding_stays_within_its_estimate(tmp_path):
    # 3000 x 3000 16-bit grey: the float64 conversion took ~27 bytes a pixel (243 MB); the estimate allows 12.
    pixels = np.zeros((3000, 3000), np.uint16)
    pixels[:, :1500] = 40_000
    Image.fromarray(pixels).save(tmp_path / "grey16.png")
    out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path / "grey16.png")], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.split()
    growth, estimate = map(int, out)
    assert growth < estimate, f"decoding grew the process by {growth:,} bytes, over the {estimate:,} estimated"


def test_formats_outside_the_allow_list_are_refused_before_decoding(tmp_path):
    for fmt, name in (("EPS", "drawing.eps"), ("ICO", "icon.png"), ("PPM", "portable.jpg")):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / name, fmt)
        with pytest.raises(ImageReadError, match=rf"{name}: format {fmt} is not accepted \(accepted: JPEG, PNG, GIF, "
                                                 r"BMP, TIFF, WEBP\)"):
            read_image(tmp_path / name)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "EPS")
    with pytest.raises(ImageReadError, match="format EPS is not accepted"):
        read_image(io.BytesIO(buffer.getvalue()))
    for short in (b"", b"ab"):  # too short for some formats' signature checks
        with pytest.raises(ImageReadError, match="not an image Pillow can decode"):
            read_image(io.BytesIO(short))
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, fmt)
        assert read_image(buffer).size == (40, 30), fmt


@pytest.mark.parametrize("name, content, reason", [
    ("truncated.jpg", None, "truncated"),
    ("empty.jpg", b"", "empty file"),
    ("text.png", b"hello, not a picture", "not an image Pillow can decode"),
])
def test_bad_files_raise_naming_path_and_reason(tmp_path, name, content, reason):
    path = tmp_path / "sub" / name
    if content is None:
        data = make_image(tmp_path / "good.jpg", (90, 30, 30), size=(200, 150), pattern="stripes").read_bytes()
        content = data[: len(data) // 2]
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path) and reason in info.value.reason
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path / "sub")


def test_load_image_returns_none_and_records(tmp_path, caplog):
    good = make_image(tmp_path / "good.png", (5, 5, 5))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    skipped = SkippedImages()
    assert load_image(good, skipped).mode == "RGB"
    with caplog.at_level("WARNING"):
        assert load_image(bad, skipped) is None
        assert load_image(bad) is None  # no record asked for: still no exception
    assert len(skipped) == 1 and list(skipped)[0][0] == str(bad) and str(bad) in caplog.text
    assert skipped.summary() == f"skipped 1 unreadable file(s): {bad}"
    skipped.save(tmp_path / "out" / "skipped.tsv")
    lines = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "path\treason" and lines[1].startswith(f"{bad}\t") and len(lines) == 2
    many = SkippedImages()
    for i in range(12):
        many.add(f"f{i:02d}.jpg", "bad")
    assert many.summary(limit=3) == "skipped 12 unreadable file(s): f00.jpg, f01.jpg, f02.jpg and 9 more"
    assert SkippedImages().summary() == ""


def test_list_images_skips_hidden_files_and_outside_symlinks(tmp_path):
    root = tmp_path / "root"
    kept = [make_image(root / "a" / "x.jpg", (1, 1, 1)), make_image(root / "b" / "y.png", (2, 2, 2))]
    for hidden in ("a/.DS_Store", "a/Thumbs.db", "a/desktop.ini", "a/.hidden.jpg", ".cache/z.jpg", "a/._x.jpg"):
        (root / hidden).parent.mkdir(parents=True, exist_ok=True)
        (root / hidden).write_bytes(b"\0")
    outside = make_image(tmp_path / "elsewhere" / "o.jpg", (3, 3, 3))
    (root / "a" / "out_link.jpg").symlink_to(outside)
    (root / "b" / "in_link.jpg").symlink_to(root / "a" / "x.jpg")
    skipped = SkippedImages()
    found = list_images(root, skipped=skipped)
    assert found == sorted(kept + [root / "b" / "in_link.jpg"])
    assert dict(skipped) == {str(root / "a" / "out_link.jpg"): f"symlink points outside {root}"}
    assert [images.image_key(p, root) for p in found] == ["a/x.jpg", "b/in_link.jpg", "b/y.png"]
    assert list_images(tmp_path / "nothing_here") == []


def test_shorter_side_reads_the_header_only(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "wide.jpg")
    Image.new("RGB", (90, 150)).save(tmp_path / "tall.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert images.shorter_side(tmp_path / "wide.jpg") == 300
    assert images.shorter_side(tmp_path / "tall.png") == 90
    assert images.shorter_side(tmp_path / "broken.jpg") is None
    assert images.shorter_side(tmp_path / "missing.jpg") is None
