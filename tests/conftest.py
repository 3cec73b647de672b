"""Fixtures shared by the test modules: paths, the bundled sample, and small generated datasets."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "fridgeObjects"
SHARED_DIR = REPO.parent / "shared"
TEXTURES_DIR = SHARED_DIR / "datasets" / "fashionTexture11"


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def sample_dir():
    """The bundled fridgeObjects sample: 134 real photos in 4 labels."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def textures_dir():
    """The scraped texture set in ../shared; tests that need it skip with the reason when it is absent."""
    if not TEXTURES_DIR.is_dir():
        pytest.skip(f"{TEXTURES_DIR} is absent (scraped images are never in the repo)")
    return TEXTURES_DIR


def make_image(path, color, size=(64, 48), pattern=None, fmt=None):
    """Write a small real image: a flat colour, or stripes/dots to give labels a visual signature."""
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = color
    if pattern == "stripes":
        arr[::8] = 255 - np.asarray(color, np.uint8)
    elif pattern == "dots":
        arr[::6, ::6] = 255 - np.asarray(color, np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


# Three labels a network tells apart at a glance: colour plus a pattern.
LABEL_LOOKS = {"red": ((200, 30, 30), "stripes"), "green": ((30, 180, 40), "dots"), "blue": ((30, 40, 200), None)}


def make_labelled_images(root, n_per_label):
    """Write ``root/<label>/<label>_<i>.jpg`` for every label of LABEL_LOOKS; returns ``root``."""
    for label, (color, pattern) in LABEL_LOOKS.items():
        for i in range(n_per_label):
            make_image(Path(root) / label / f"{label}_{i}.jpg", color, pattern=pattern)
    return Path(root)


@pytest.fixture
def tiny_dataset(tmp_path):
    """data/<name>/<label>/ with 3 labels x 8 small images, laid out like a real dataset."""
    return make_labelled_images(tmp_path / "data" / "tiny", 8)


def run_script(script, *args, cwd=REPO, env=None, timeout=900):
    """Run a numbered script with the test interpreter; returns the CompletedProcess (never raises on exit code)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
