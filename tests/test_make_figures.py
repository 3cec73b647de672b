"""doc/make_figures.py makes exactly the figures and console logs the README uses, from a run on the sample."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "doc" / "make_figures.py"


@pytest.mark.slow  # the pipeline (one epoch), A1, the web service and Chromium: about 2 minutes on 2 shared cores
def test_make_figures_writes_the_committed_set(tmp_path):
    for binary in (Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")):
        if not binary.is_file():
            pytest.skip(f"{binary} is missing: apt-get install chromium chromium-driver")
    out, work = tmp_path / "doc", tmp_path / "work"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "renamed_long_ago.png").write_bytes(b"stale")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work", str(work),
                             "--set", "rf_maxEpochs=1"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 stale file(s) removed" in result.stdout

    def names(folder, pattern):
        return sorted(path.name for path in folder.glob(pattern))

    assert names(out / "figures", "*.png") == names(REPO / "doc" / "figures", "*.png")
    assert names(out / "console", "*.txt") == names(REPO / "doc" / "console", "*.txt")
    for path in (out / "figures").glob("*.png"):
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 150, path
            assert not set(img.text) - {"Software"}, f"{path.name} carries metadata beyond the software: {img.text}"
    with Image.open(out / "figures" / "web_page.png") as img:
        assert img.convert("L").getextrema()[0] < 100  # a rendered page, not a blank one
    step2 = (out / "console" / "2_refineDNN.txt").read_text(encoding="utf-8")
    assert step2.startswith("rf_inputResolution = 'auto': 224 px")  # the sample's thumbnails
    assert "\nRefining efficientnet_lite0 at 224 px" in step2 and "Done: best epoch 1 of 1" in step2
    for path in (out / "console").glob("*.txt"):
        text = path.read_text(encoding="utf-8")
        assert "\r" not in text and str(work) not in text and str(REPO) not in text, path.name
    assert "Done: served fridgeObjects" in (out / "console" / "A4_webService.txt").read_text(encoding="utf-8")
