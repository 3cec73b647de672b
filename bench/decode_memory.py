"""Peak memory of decoding the largest image read_image accepts, per mode, against its header estimate.

For each Pillow mode a file reaches (1, L, P, LA, I;16, I, F, RGB, RGBA, CMYK), one image of the largest size that
``read_image``'s limits allow (``MAX_IMAGE_PIXELS``, and ``MAX_DECODE_BYTES`` through ``decode_bytes``) is written
(PNG, or TIFF for the modes PNG cannot hold), plus a 1-pixel-high strip where Pillow can write one; each is decoded
through ``read_image`` in a fresh subprocess, which reports its peak resident memory (VmHWM, so Linux only) before
and after. The growth must stay under the estimate ``decode_bytes`` checks before decoding. Prints a table and
writes bench/results/decode_memory.json.

    python bench/decode_memory.py                 # ~3 min, ~2 GB of temporary files
    python bench/decode_memory.py --modes "I;16"  # one mode
"""
import argparse
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from image_similarity.data.fileio import save_json  # noqa: E402
from image_similarity.data.images import MAX_DECODE_BYTES, MAX_IMAGE_PIXELS, decode_bytes  # noqa: E402

MODES = ("1", "L", "P", "LA", "I;16", "I", "F", "RGB", "RGBA", "CMYK")
TIFF_MODES = {"I", "F", "CMYK"}

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child would report the parent's peak.
CHILD = """
import re, sys
sys.path.insert(0, {repo!r})
from image_similarity.data.images import read_image
def peak():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)) * 1024
before = peak()
image = read_image({path!r})
print(before, peak(), image.width, image.height)
"""


def largest_size(mode, strip):
    """(width, height) of the largest image of ``mode`` both limits accept: square, or 1 pixel high."""
    per_pixel = decode_bytes(mode, 1, 1)
    n_pixels = min(MAX_IMAGE_PIXELS, MAX_DECODE_BYTES // per_pixel)
    if strip:
        return n_pixels, 1
    side = math.isqrt(n_pixels)
    return side, side


def write_image(mode, size, folder):
    """A file of ``mode`` and ``size`` with a gradient in its first rows (so it is not all one colour)."""
    image = Image.new(mode, size)
    image.paste(Image.linear_gradient("L").resize((min(size[0], 256), min(size[1], 256))).convert(mode), (0, 0))
    if mode == "P":
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    fmt = "TIFF" if mode in TIFF_MODES else "PNG"
    path = Path(folder) / f"{mode.replace(';', '_')}_{size[0]}x{size[1]}.{fmt.lower()}"
    image.save(path, fmt, **({"compress_level": 1} if fmt == "PNG" else {"compression": "tiff_adobe_deflate"}))
    with Image.open(path) as check:
        assert check.mode == mode, f"{path} reopens as {check.mode}, not {mode}"
    return path


def measure(path):
    """Peak RSS before and after read_image in a fresh interpreter, in bytes, and the decoded size."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), path=str(path))], capture_output=True,
                         text=True, check=True).stdout.split()
    before, after, width, height = map(int, out)
    return before, after, width, height


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated Pillow modes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decode_memory.json")
    args = parser.parse_args()
    rows = []
    print(f"{'mode':6} {'size':>16} {'file MB':>8} {'estimate MB':>12} {'peak growth MB':>15} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes.split(","):
            for strip in (False, True):
                size = largest_size(mode, strip)
                try:
                    path = write_image(mode, size, folder)
                except MemoryError:  # Pillow's encoders cannot hold a row of tens of millions of 4-byte pixels
                    print(f"{mode:6} {f'{size[0]}x{size[1]}':>16} (Pillow cannot write it)")
                    continue
                before, after, width, height = measure(path)
                estimate = decode_bytes(mode, *size)
                row = {"mode": mode, "width": size[0], "height": size[1], "file_bytes": path.stat().st_size,
                       "estimate_bytes": estimate, "rss_before_bytes": before, "rss_peak_bytes": after,
                       "growth_bytes": after - before, "growth_over_estimate": round((after - before) / estimate, 3)}
                rows.append(row)
                path.unlink()
                print(f"{mode:6} {f'{width}x{height}':>16} {row['file_bytes'] / 1e6:8.1f} {estimate / 1e6:12.0f} "
                      f"{row['growth_bytes'] / 1e6:15.0f} {row['growth_over_estimate']:6.2f}")
    save_json(args.out, {"max_image_pixels": MAX_IMAGE_PIXELS, "max_decode_bytes": MAX_DECODE_BYTES,
                         "python": platform.python_version(), "pillow": Image.__version__,
                         "machine": platform.processor() or platform.machine(), "rows": rows})
    print(f"Wrote {args.out}")
    worst = max(rows, key=lambda r: r["growth_over_estimate"])
    print(f"Done: {len(rows)} images; the worst used {worst['growth_over_estimate']:.2f} of its estimate "
          f"({worst['mode']}, {worst['width']}x{worst['height']}).")


if __name__ == "__main__":
    main()
