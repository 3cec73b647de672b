"""A2_featurizeImagesInDir.py run as a subprocess on folders outside the repository, incrementally."""
import os
import shutil

import numpy as np

from conftest import REPO, SAMPLE_DIR, make_image, run_script
from image_similarity.models import backbones
from image_similarity.models.checkpoints import save_checkpoint
from image_similarity.models.heads import ImageClassifier
from image_similarity.data import features

SCRIPT = "A2_featurizeImagesInDir.py"


def _run(folder, out, *args, cwd=REPO):
    """No model.pt in the scratch workDir: the default model is the pretrained backbone whatever the repo holds."""
    return run_script(SCRIPT, folder, "--out", out, "--set", f"workDir={folder.parent}", *args, cwd=cwd, timeout=600)


def _load(out):
    stored = features.load_features(out, mmap=False)
    return {"keys": stored.keys, "features": stored.matrix, "model_id": stored.meta["model_id"]}


def _done(result):
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_incremental_runs(tmp_path):
    folder = tmp_path / "photos"
    assert REPO not in folder.parents
    (folder / "cans").mkdir(parents=True)
    for src in sorted((SAMPLE_DIR / "can").glob("*.jpg"))[:2]:
        shutil.copy(src, folder / "cans" / src.name)
    make_image(folder / "top.png", (30, 180, 40), pattern="dots")
    out = tmp_path / "out" / "feats.npy"

    assert _done(_run(folder, out, "--recursive")).startswith("Done: embedded 3, reused 0,")
    first = _load(out)
    assert first["keys"] == ["cans/can_1.jpg", "cans/can_10.jpg", "top.png"]
    assert first["features"].shape == (3, 1280) and first["features"].dtype == np.float32
    assert str(first["model_id"]) == "pretrained:efficientnet_lite0"

    assert _done(_run(folder, out, "--recursive", cwd=tmp_path)).startswith("Done: embedded 0, reused 3,")
    np.testing.assert_array_equal(_load(out)["features"], first["features"])

    make_image(folder / "cans" / "new.jpg", (200, 30, 30), pattern="stripes")  # one added, one deleted
    os.remove(folder / "cans" / "can_1.jpg")
    assert _done(_run(folder, out, "--recursive")) == "Done: embedded 1, reused 2, dropped 1 removed, skipped 0."
    assert _load(out)["keys"] == ["cans/can_10.jpg", "cans/new.jpg", "top.png"]

    make_image(folder / "top.png", (30, 40, 200), size=(80, 80))  # changed content under the same name
    (folder / "cans" / "bad.jpg").write_bytes(b"garbage")
    assert _done(_run(folder, out, "--recursive")) == "Done: embedded 1, reused 2, dropped 0 removed, skipped 1."
    final = _load(out)
    assert final["keys"] == ["cans/can_10.jpg", "cans/new.jpg", "top.png"]
    assert not np.allclose(final["features"][2], first["features"][2])
    np.testing.assert_array_equal(final["features"][0], first["features"][1])
    assert (tmp_path / "out" / "feats_skipped.tsv").read_text().count("bad.jpg") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.json", "feats.npy", "feats_skipped.tsv"]


def test_another_model_recomputes_everything(tmp_path):
    folder = tmp_path / "imgs"
    make_image(folder / "a.png", (200, 30, 30))
    make_image(folder / "b.png", (30, 40, 200), pattern="dots")
    out = tmp_path / "f.npy"
    assert _done(_run(folder, out)).startswith("Done: embedded 2,")
    model = ImageClassifier(backbones.create_model("efficientnet_lite0", pretrained=False), 2)
    checkpoint = save_checkpoint(tmp_path / "model.pt", model, "efficientnet_lite0", ["x", "y"],
                                 backbones.get_backbone("efficientnet_lite0").data_config(64))
    result = _run(folder, out, "--model", checkpoint)
    assert "recomputed all" in result.stdout and _done(result).startswith("Done: embedded 2, reused 0,")
    assert str(_load(out)["model_id"]) == backbones.model_id(checkpoint)


def test_bad_arguments(tmp_path):
    make_image(tmp_path / "nested" / "sub" / "a.png", (1, 2, 3))
    result = _run(tmp_path / "nested", tmp_path / "f.npy")  # images only in a sub-folder, no --recursive
    assert result.returncode == 2 and "no images in" in result.stderr and "--recursive" in result.stderr
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not a features store")
    make_image(tmp_path / "one" / "a.png", (1, 2, 3))
    result = _run(tmp_path / "one", junk)
    assert result.returncode == 2 and f"{junk}: not a features store" in result.stderr
    assert junk.read_bytes() == b"not a features store"
