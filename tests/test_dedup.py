"""Near-duplicate detection on real photos from the bundled sample and on hand-made hashes."""
import shutil
import subprocess
import sys

import imagehash
import numpy as np
import pytest
from PIL import Image

from image_similarity import dedup
from image_similarity.images import SkippedImages

HASH_SIZE, MAX_DISTANCE = 16, 10  # PARAMETERS.py defaults


@pytest.fixture
def photo_folder(tmp_path, sample_dir):
    """orig/ holds a photo, its exact copy, a 2x resized copy and a JPEG-recompressed copy; other/ a different photo."""
    original = sample_dir / "can" / "can_1.jpg"
    folder = tmp_path / "photos"
    (folder / "orig").mkdir(parents=True)
    (folder / "other").mkdir()
    shutil.copy(original, folder / "orig" / "a_original.jpg")
    shutil.copy(original, folder / "orig" / "b_copy.jpg")
    with Image.open(original) as img:
        img.resize((img.width * 2, img.height * 2), Image.BICUBIC).save(folder / "orig" / "c_resized.png")
        img.save(folder / "orig" / "d_recompressed.jpg", quality=60)
    shutil.copy(sample_dir / "carton" / "carton_45.jpg", folder / "other" / "carton.jpg")
    shutil.copy(sample_dir / "can" / "can_10.jpg", folder / "other" / "another_can.jpg")
    return folder


def _hash(bits):
    return imagehash.ImageHash(np.array(bits, dtype=bool).reshape(4, 4))


def test_copies_are_grouped_with_the_original_and_a_different_photo_is_not(photo_folder):
    keys = ["orig/a_original.jpg", "orig/b_copy.jpg", "orig/c_resized.png", "orig/d_recompressed.jpg",
            "other/another_can.jpg", "other/carton.jpg"]
    hashes = dedup.hash_images(keys, root=photo_folder, hash_size=HASH_SIZE, progress=False)
    assert sorted(hashes) == sorted(keys)
    assert all(h.hash.size == HASH_SIZE ** 2 for h in hashes.values())
    groups = dedup.find_near_duplicate_groups(hashes, MAX_DISTANCE)
    assert groups == [keys[:4]]
    assert dedup.kept_key(groups[0]) == "orig/a_original.jpg"
    assert dedup.duplicates_to_remove(groups) == keys[1:4]


def test_paths_and_keys_give_the_same_keys(photo_folder):
    by_path = dedup.hash_images(sorted(photo_folder.rglob("*.*")), root=photo_folder, progress=False)
    by_key = dedup.hash_images([p.relative_to(photo_folder).as_posix() for p in sorted(photo_folder.rglob("*.*"))],
                               root=photo_folder, progress=False)
    assert by_path == by_key and len(by_path) == 6
    without_root = dedup.hash_images([photo_folder / "other" / "carton.jpg"], progress=False)
    assert list(without_root) == [str(photo_folder / "other" / "carton.jpg")]


def test_threshold_is_inclusive_and_groups_are_transitive():
    zero = [0] * 16
    three = [1, 1, 1] + [0] * 13
    six = [1] * 6 + [0] * 10  # 3 bits from `three`, 6 from `zero`
    far = [1] * 16
    hashes = {"z": _hash(zero), "b3": _hash(three), "c6": _hash(six), "far": _hash(far)}
    assert dedup.find_near_duplicate_groups(hashes, 2) == []
    assert dedup.find_near_duplicate_groups(hashes, 3) == [["b3", "c6", "z"]]
    assert dedup.find_near_duplicate_groups(hashes, 10) == [["b3", "c6", "far", "z"]]
    assert dedup.find_near_duplicate_groups(hashes, 0) == []
    assert dedup.find_near_duplicate_groups({"x": _hash(zero), "y": _hash(zero)}, 0) == [["x", "y"]]
    with pytest.raises(ValueError, match="max_distance"):
        dedup.find_near_duplicate_groups(hashes, -1)


def test_groups_are_sorted_and_independent_of_input_order():
    hashes = {"q": _hash([0] * 16), "p": _hash([0] * 16), "b": _hash([1] * 16), "a": _hash([1] * 15 + [0])}
    groups = dedup.find_near_duplicate_groups(hashes, 1)
    assert groups == [["a", "b"], ["p", "q"]]
    assert dedup.find_near_duplicate_groups(dict(reversed(hashes.items())), 1) == groups
    assert dedup.duplicates_to_remove(groups) == ["b", "q"]
    assert dedup.find_near_duplicate_groups({"only": _hash([0] * 16)}, 5) == []


@pytest.mark.parametrize("method", sorted(dedup.HASH_METHODS))
def test_every_method_finds_the_exact_copy(photo_folder, method):
    hashes = dedup.hash_images(["orig/a_original.jpg", "orig/b_copy.jpg", "other/carton.jpg"], root=photo_folder,
                               hash_size=8, method=method, progress=False)
    assert dedup.find_near_duplicate_groups(hashes, 0) == [["orig/a_original.jpg", "orig/b_copy.jpg"]]


def test_bad_arguments_are_refused(photo_folder):
    with pytest.raises(ValueError, match="unknown hash method 'md5'.*dhash"):
        dedup.hash_images([], root=photo_folder, method="md5")
    with pytest.raises(ValueError, match="hash_size"):
        dedup.hash_images([], root=photo_folder, hash_size=1)


def test_corrupt_file_is_skipped_and_named(photo_folder, caplog):
    good = (photo_folder / "orig" / "a_original.jpg").read_bytes()
    (photo_folder / "orig" / "e_truncated.jpg").write_bytes(good[: len(good) // 3])
    (photo_folder / "orig" / "f_text.jpg").write_text("not an image")
    skipped = SkippedImages()
    with caplog.at_level("WARNING"):
        hashes = dedup.hash_images(["orig/a_original.jpg", "orig/e_truncated.jpg", "orig/f_text.jpg"],
                                   root=photo_folder, skipped=skipped, progress=False)
    assert list(hashes) == ["orig/a_original.jpg"]
    assert sorted(skipped.items) == [str(photo_folder / "orig" / "e_truncated.jpg"),
                                     str(photo_folder / "orig" / "f_text.jpg")]
    assert "e_truncated.jpg" in caplog.text and "f_text.jpg" in caplog.text


def test_command_line_prints_the_groups(photo_folder, repo_root, capsys):
    (photo_folder / "other" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = subprocess.run([sys.executable, "-m", "image_similarity.dedup", str(photo_folder)],
                            capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert ("group 1: orig/a_original.jpg (kept), orig/b_copy.jpg, orig/c_resized.png, orig/d_recompressed.jpg"
            in result.stdout)
    assert "1 group(s) of near-duplicates in 6 image(s)" in result.stdout
    assert "3 would be removed" in result.stdout and "broken.png" in result.stdout
    dedup._main([str(photo_folder), "--max-distance", "0", "--method", "dhash"])  # same entry point, in-process
    assert "group 1: orig/a_original.jpg (kept), orig/b_copy.jpg\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        dedup._main([str(photo_folder / "nope")])
    assert info.value.code == 2 and "is not a folder" in capsys.readouterr().err
