"""image_similarity.pipeline.plots: figures written as PNGs of the documented size, without timestamps."""
import numpy as np
import pytest
from PIL import Image

from image_similarity.pipeline import plots

HEADER = ["label", "train", "val", "test", "total"]
ROWS = [["can", 20, 4, 8, 32], ["carton", 20, 4, 8, 32], ["all", 40, 8, 16, 64]]


def test_plot_table_writes_a_png_of_the_documented_size(tmp_path):
    path = plots.plot_table(HEADER, ROWS, tmp_path / "table.png", title="Images per label", bold_last_row=True)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (round(1.6 * 5 * plots.DPI), round((0.35 * 4 + 0.5) * plots.DPI))
        pixels = np.asarray(img.convert("L"))
        # Text and grid lines are drawn (dark pixels), and the header row is shaded grey.
        assert (pixels < 100).mean() > 0.01
        assert np.any((pixels > 200) & (pixels < 245))
        # Regenerating the docs gives identical files: no creation time, only matplotlib's version.
        assert set(img.text) == {"Software"}
    again = plots.plot_table(HEADER, ROWS, tmp_path / "again.png", title="Images per label", bold_last_row=True)
    assert again.read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, none left behind


def test_plot_table_without_title_is_shorter(tmp_path):
    path = plots.plot_table(HEADER[:2], [["can", 20]], tmp_path / "small.png")
    with Image.open(path) as img:
        assert img.size == (round(1.6 * 2 * plots.DPI), round((0.35 * 2 + 0.3) * plots.DPI))


def test_plot_table_refuses_ragged_rows(tmp_path):
    with pytest.raises(ValueError, match="every row needs 5 cells"):
        plots.plot_table(HEADER, [["can", 20, 4]], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_distances_keep_three_significant_digits():
    """Class-probability distances are tiny; the figures must still tell them apart."""
    assert [plots.format_distance(d) for d in (2.3456e-5, 4.1e-4, 0.43219, 12.3456, 0.0)] == \
        ["2.35e-05", "0.00041", "0.432", "12.3", "0"]


def test_top_n_curves_that_coincide_all_stay_visible(tmp_path):
    """Three rankers with the same accuracies: each one's colour still shows (L2 under cosine was invisible)."""
    same = {f"top{n}": a for n, a in zip((1, 2, 4, 8), (0.5, 0.7, 0.8, 0.95))}
    path = plots.plot_top_n_curves({"L2": same, "cosine": same, "weightedl2": same}, [1, 2, 4, 8], tmp_path / "t.png")
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):  # matplotlib's C0, C1, C2
        near = (np.abs(pixels - colour).sum(axis=-1) < 40).sum()
        assert near > 250, f"colour {colour} covers only {near} pixels"  # its legend entry alone: about 100
