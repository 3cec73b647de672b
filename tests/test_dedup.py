"""Near-duplicate detection on real photos from the bundled sample and on hand-made hashes."""
import shutil
import subprocess
import sys

import imagehash
import numpy as np
import pytest
from PIL import Image

from image_similarity.apps import dedup, dedup_cli
from image_similarity.data.images import SkippedImages

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
    result = subprocess.run([sys.executable, "-m", "image_similarity.apps.dedup", str(photo_folder)],
                            capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert ("group 1: orig/a_original.jpg (kept), orig/b_copy.jpg, orig/c_resized.png, orig/d_recompressed.jpg"
            in result.stdout)
    assert "1 group(s) of near-duplicates in 6 image(s)" in result.stdout
    assert "3 would be removed" in result.stdout and "broken.png" in result.stdout
    dedup_cli.main([str(photo_folder), "--max-distance", "0", "--method", "dhash"])  # same entry point, in-process
    assert "group 1: orig/a_original.jpg (kept), orig/b_copy.jpg\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        dedup_cli.main([str(photo_folder / "nope")])
    assert info.value.code == 2 and "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ encodings, search, CLI, moves (issue 19)
def _cli(*args, cwd, prelude=""):
    """Run the dedup command line in a real subprocess; ``prelude`` is Python run first (e.g. a kill switch)."""
    code = f"{prelude}\nfrom image_similarity.apps import dedup_cli\ndedup_cli.main({[str(a) for a in args]!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def _read_csv(path):
    return [line.split(",") for line in path.read_text().splitlines()]


@pytest.fixture
def copies_folder(photo_folder):
    """photo_folder plus a mirrored and a quarter-turned copy of the original."""
    with Image.open(photo_folder / "orig" / "a_original.jpg") as img:
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo_folder / "other" / "flipped.jpg", quality=90)
        img.transpose(Image.Transpose.ROTATE_90).save(photo_folder / "other" / "turned.png")
    return photo_folder


COPIES = ["orig/a_original.jpg", "orig/b_copy.jpg", "orig/c_resized.png", "orig/d_recompressed.jpg"]


@pytest.mark.parametrize("method", sorted(dedup.HASH_METHODS))
def test_encodings_file_round_trip_and_groups_of_known_copies(copies_folder, tmp_path, method):
    paths = sorted(copies_folder.rglob("*.*"))
    plain = dedup.encode(paths, root=copies_folder, path=tmp_path / "enc.npy", method=method, progress=False)
    assert len(plain) == 8 and plain.array.shape == (8, 1, 32) and plain.meta["method"] == method
    loaded = dedup.load_encodings(tmp_path / "enc.npy")
    assert loaded.keys == plain.keys and np.array_equal(loaded.array, plain.array)
    groups = dedup.find_duplicates(loaded, progress=False)
    assert [key for key, _ in groups[0]] == COPIES and len(groups) == 1
    assert groups[0][0] == ("orig/a_original.jpg", 0.0) and groups[0][1] == ("orig/b_copy.jpg", 0.0)
    assert all(0 <= distance <= dedup.DEFAULT_THRESHOLDS[method] for _, distance in groups[0][2:])
    invariant = dedup.encode(paths, root=copies_folder, method=method, invariant=True, progress=False)
    assert invariant.array.shape == (8, 8, 32) and np.array_equal(invariant.array[:, 0], plain.array[:, 0])
    groups = dedup.find_duplicates(invariant, progress=False)
    assert [key for key, _ in groups[0]] == sorted(COPIES + ["other/flipped.jpg", "other/turned.png"])


def test_multi_index_hashing_finds_exactly_what_brute_force_finds(monkeypatch):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (3000, 256), dtype=np.uint8)
    planted = rng.choice(3000, 60, replace=False)
    copies = bits[planted].copy()
    for row, n_flips in zip(copies, rng.integers(0, 13, 60)):   # 0..12 flipped bits: some beyond 10
        row[rng.choice(256, n_flips, replace=False)] ^= 1
    packed = np.packbits(np.concatenate([bits, copies]), axis=1)[:, None, :]
    encodings = dedup.Encodings([f"{i:05d}" for i in range(len(packed))], packed, {"method": "dhash"})
    flat = dedup.find_duplicates(encodings, 10, progress=False)
    monkeypatch.setattr(dedup, "MULTIHASH_FROM", 0)
    assert isinstance(dedup._binary_index(256, 10, 3000), dedup.faiss.IndexBinaryMultiHash)
    assert dedup.find_duplicates(encodings, 10, progress=False) == flat
    found = {tuple(key for key, _ in group) for group in flat}
    expected = {(f"{p:05d}", f"{3000 + i:05d}") for i, p in enumerate(planted)
                if np.count_nonzero(bits[p] != copies[i]) <= 10}
    assert found == expected and 0 < len(expected) < 60


def test_command_line_writes_csv_sheet_and_encodings_and_names_bad_files_once(copies_folder, tmp_path):
    (copies_folder / "other" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "report" / "groups.csv"
    result = _cli(copies_folder, "--invariant", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _read_csv(out)
    assert rows[0] == ["group", "key", "status", "distance"]
    assert [(r[0], r[1], r[2]) for r in rows[1:3]] == [("1", "orig/a_original.jpg", "kept"),
                                                       ("1", "orig/b_copy.jpg", "duplicate")]
    assert {r[1] for r in rows[1:]} == set(COPIES + ["other/flipped.jpg", "other/turned.png"])
    assert rows[1][3] == "0" and all(r[2] == "duplicate" for r in rows[2:])
    with Image.open(out.with_suffix(".png")) as sheet:
        assert sheet.width > 128 and sheet.height > 128
    assert len(dedup.load_encodings(out.with_suffix(".encodings.npy"))) == 8
    assert "5 would be removed" in result.stdout
    assert result.stdout.count("broken.png") == 1 and result.stderr.count("broken.png") == 1
    assert not list(out.parent.glob(".*.tmp"))
    default = _cli(copies_folder, "--method", "ahash", cwd=tmp_path)   # default output beside the folder
    assert default.returncode == 0 and (copies_folder.parent / "photos_near_duplicates_ahash.csv").is_file()


def test_bad_arguments_are_refused_in_one_line_before_any_image_is_read(photo_folder, tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not an encodings file")
    (tmp_path / "a_file").write_text("a file where the destination's parent should be")
    np.save(tmp_path / "no_sidecar.npy", np.zeros((2, 32), np.uint8))
    cases = [(["--hash-size", "100000"], "hash_size must be an integer in 2..64, got 100000"),
             (["--hash-size", "1"], "hash_size must be an integer in 2..64, got 1"),
             (["--threshold", "-1"], "threshold for dhash is a whole number of bits in 0..256, got -1.0"),
             (["--threshold", "2.5"], "threshold for dhash is a whole number of bits in 0..256, got 2.5"),
             (["--method", "cnn", "--threshold", "3"], "threshold for 'cnn' is a cosine distance in [0, 2], got 3.0"),
             (["--move-duplicates", photo_folder / "dups"], f"must lie outside {photo_folder}"),
             (["--move-duplicates", tmp_path / "a_file" / "dups"], "cannot create the folder"),
             (["--against", tmp_path / "junk.npy"], "is not an encodings file written by this command"),
             (["--against", tmp_path / "no_sidecar.npy"], "is not an encodings file written by this command"),
             (["--against", tmp_path / "missing.npy"], "not found")]
    for args, message in cases:
        result = _cli(photo_folder, *args, "--out", tmp_path / "groups.csv", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("python -m")
        assert not (tmp_path / "groups.encodings.npy").exists() and not (photo_folder / "dups").exists(), args


def test_a_full_destination_is_one_line_naming_the_file_and_nothing_is_lost(copies_folder, tmp_path):
    originals = {p.relative_to(copies_folder).as_posix(): p.read_bytes() for p in copies_folder.rglob("*.*")}
    # Moving to another file system copies; the copy fails as on a full disk.
    prelude = ("import errno, os, shutil\n"
               "def rename(a, b):\n    raise OSError(errno.EXDEV, 'Invalid cross-device link')\n"
               "def copy2(a, b):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
               "os.rename, shutil.copy2 = rename, copy2")
    result = _cli(copies_folder, "--move-duplicates", tmp_path / "moved", cwd=tmp_path, prelude=prelude)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'moved' / 'orig' / 'b_copy.jpg'}: cannot "
                                                      "write: No space left on device")
    assert {p.relative_to(copies_folder).as_posix(): p.read_bytes() for p in copies_folder.rglob("*.*")} == originals
    assert [p.name for p in (tmp_path / "moved").rglob("*") if p.is_file()] == ["moved.tsv"]


def test_groups_csv_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "groups.csv"
    dedup.save_groups_csv(out, [[("a.jpg", 0.0), ("b.jpg", 3.0)]])
    before = out.read_text()
    assert before == "group,key,status,distance\n1,a.jpg,kept,0\n1,b.jpg,duplicate,3\n"

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(dedup.os, "replace", crash)   # fileio renames the finished temporary file with os.replace
    with pytest.raises(OSError, match="disk full"):
        dedup.save_groups_csv(out, [[("c.jpg", 0.0), ("d.jpg", 1.0)]])
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["groups.csv"]


@pytest.mark.parametrize("when", ["before", "after"])
def test_move_duplicates_survives_kill_9_mid_move(copies_folder, tmp_path, when):
    originals = {p.relative_to(copies_folder).as_posix(): p.read_bytes() for p in copies_folder.rglob("*.*")}
    moved_dir = tmp_path / "moved"
    # SIGKILL this process at the second file move, just before or just after the rename.
    prelude = ("import os, signal\n_rename, _calls = os.rename, []\n"
               "def rename(a, b):\n    _calls.append(a)\n"
               f"    if len(_calls) == 2 and {when == 'after'}: _rename(a, b)\n"
               "    if len(_calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n    _rename(a, b)\n"
               "os.rename = rename")
    killed = _cli(copies_folder, "--invariant", "--move-duplicates", moved_dir, cwd=tmp_path, prelude=prelude)
    assert killed.returncode == -9
    in_dir = lambda root: {p.relative_to(root).as_posix() for p in root.rglob("*.*") if p.name != "moved.tsv"}  # noqa: E731
    assert len(in_dir(moved_dir)) == (2 if when == "after" else 1)
    rerun = _cli(copies_folder, "--invariant", "--move-duplicates", moved_dir, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    left, moved = in_dir(copies_folder), in_dir(moved_dir)
    assert not left & moved and left | moved == set(originals)          # every file exactly once
    assert moved == set(COPIES[1:] + ["other/flipped.jpg", "other/turned.png"])
    assert all((moved_dir / key).read_bytes() == originals[key] for key in moved)
    again = _cli(copies_folder, "--invariant", "--move-duplicates", moved_dir, cwd=tmp_path)
    assert again.returncode == 0 and "moved 0 duplicate(s)" in again.stdout and in_dir(moved_dir) == moved


def test_against_finds_a_new_copy_of_an_old_image_without_re_encoding(photo_folder, tmp_path, sample_dir):
    first = _cli(photo_folder, "--out", tmp_path / "old.csv", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    old = tmp_path / "old.encodings.npy"
    new_folder = tmp_path / "incoming"
    new_folder.mkdir()
    with Image.open(photo_folder / "other" / "carton.jpg") as img:
        img.resize((img.width * 2, img.height * 2), Image.BICUBIC).save(new_folder / "big_carton.jpg", quality=90)
    shutil.copy(sample_dir / "milk_bottle" / "milk_bottle_100.jpg", new_folder / "milk.jpg")
    result = _cli(new_folder, "--against", old, "--out", tmp_path / "new.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "in 2 image(s) under" in result.stdout and "checked against 6" in result.stdout
    rows = _read_csv(tmp_path / "new.csv")[1:]
    assert [(r[1], r[2]) for r in rows] == [(str(photo_folder.resolve() / "other" / "carton.jpg"), "kept"),
                                            ("big_carton.jpg", "duplicate")]
    # The same folder, grown: only the new file is encoded, and it joins the old group.
    shutil.copy(photo_folder / "orig" / "a_original.jpg", photo_folder / "other" / "z_new_copy.jpg")
    grown = _cli(photo_folder, "--against", old, "--out", tmp_path / "grown.csv", cwd=tmp_path)
    assert grown.returncode == 0 and "in 1 image(s) under" in grown.stdout
    assert [(r[1], r[2]) for r in _read_csv(tmp_path / "grown.csv")[1:]] == [
        ("orig/a_original.jpg", "kept"), *((key, "duplicate") for key in COPIES[1:] + ["other/z_new_copy.jpg"])]
    other_method = _cli(new_folder, "--against", old, "--method", "phash", cwd=tmp_path)
    assert other_method.returncode == 2 and "encoded differently: method 'phash' here, 'dhash' there" in \
        other_method.stderr
    overwrite = _cli(photo_folder, "--against", old, "--out", tmp_path / "old.csv", cwd=tmp_path)
    assert overwrite.returncode == 2 and "would overwrite the encodings" in overwrite.stderr


def test_cnn_groups_copies_and_the_invariant_variant_adds_flips_and_turns(copies_folder, tmp_path):
    keys = ["orig/a_original.jpg", "orig/c_resized.png", "other/carton.jpg", "other/flipped.jpg", "other/turned.png"]
    encodings = dedup.encode(keys, root=copies_folder, path=tmp_path / "cnn.npy", method="cnn", invariant=True,
                             progress=False, n_workers=0)
    assert encodings.array.shape == (5, 8, 1280) and encodings.meta["model_id"] == "pretrained:efficientnet_lite0"
    upright = dedup.Encodings(encodings.keys, encodings.array[:, :1], {**encodings.meta, "invariant": False})
    groups = dedup.find_duplicates(upright, 0.05, progress=False)   # the mirrored copy is 0.066 away, turned 0.32
    assert groups == [[("orig/a_original.jpg", 0.0), ("orig/c_resized.png", pytest.approx(0.003, abs=0.01))]]
    groups = dedup.find_duplicates(dedup.load_encodings(tmp_path / "cnn.npy"), 0.05, progress=False)
    assert [key for key, _ in groups[0]] == sorted(keys[:2] + keys[3:]) and len(groups) == 1
    with pytest.raises(ValueError, match="cosine distance in \\[0, 2\\]"):
        dedup.find_duplicates(upright, threshold=3)
