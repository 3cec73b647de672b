"""1_prepareData.py run as a subprocess on generated datasets and on the bundled sample."""
import csv
import shutil

import numpy as np
from PIL import Image

from conftest import make_image, run_script
from image_similarity.apps import dedup
from image_similarity.data import fileio
from image_similarity.data.splits import RankingSet, SPLITS, label_of, load_ranking_sets, load_split

SCRIPT = "1_prepareData.py"


def _run(work_dir, name, *overrides):
    sets = [arg for text in (f"workDir={work_dir}", f"datasetName={name}", *overrides) for arg in ("--set", text)]
    return run_script(SCRIPT, *sets, timeout=300)


def _csv(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter=delimiter))


def test_tiny_dataset_outputs(tiny_dataset):
    work = tiny_dataset.parents[1]
    result = _run(work, "tiny")
    assert result.returncode == 0, result.stderr
    proc, res = work / "proc" / "tiny", work / "results" / "tiny"
    assert fileio.load_json(proc / "lutLabel2Id.json") == {"blue": 0, "green": 1, "red": 2}
    assert fileio.load_json(proc / "lutId2Label.json") == {"0": "blue", "1": "green", "2": "red"}
    splits = {split: load_split(proc / f"imgFilenames{split.title()}.json") for split in SPLITS}
    # 8 per label: int(.75*8)=6 train, int(.2*6)=1 of them to val, 2 test
    assert {split: {label: len(keys) for label, keys in s.items()} for split, s in splits.items()} == {
        "train": {"blue": 5, "green": 5, "red": 5}, "val": {"blue": 1, "green": 1, "red": 1},
        "test": {"blue": 2, "green": 2, "red": 2}}
    all_keys = [k for s in splits.values() for keys in s.values() for k in keys]
    assert sorted(all_keys) == sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.jpg"))
    infos = {split: load_ranking_sets(proc / f"imgInfos{split.title()}.json") for split in SPLITS}
    assert [len(infos[s]) for s in SPLITS] == [15, 0, 6]  # val has one image per label: no query
    # ... which step 1 says, naming the labels, instead of step 4 finding no validation sets later
    assert ("WARNING: val holds fewer than 2 images of label(s) blue, green, red: they give no val query (no ranking "
            "sets at all)") in result.stderr
    assert "train holds" not in result.stderr and "test holds" not in result.stderr
    for split in ("train", "test"):
        keys = {k for v in splits[split].values() for k in v}
        for s in infos[split]:
            assert isinstance(s, RankingSet) and len(s.references) == 101
            assert {s.query, *s.references} <= keys
        rows = _csv(proc / f"pairs_{split}.csv")
        assert rows[0] == ["query", "reference", "is_positive"] and len(rows) == 1 + 101 * len(infos[split])
        assert sum(r[2] == "1" for r in rows[1:]) == len(infos[split])
        first = infos[split][0]
        assert rows[1:102] == [[first.query, r, str(int(p))] for r, p in zip(first.references, first.is_positive)]
    assert _csv(res / "split_counts.csv") == [["label", "train", "val", "test", "total"], ["blue", "5", "1", "2", "8"],
                                              ["green", "5", "1", "2", "8"], ["red", "5", "1", "2", "8"]]
    assert _csv(res / "near_duplicates.csv") == [["group", "key", "kept"]]
    encodings = dedup.load_encodings(proc / "dedup_encodings.npy")   # reusable with dedup --against
    assert len(encodings) == 24 and encodings.meta["method"] == "dhash" and encodings.array.shape == (24, 1, 32)
    assert _csv(res / "skipped_images.tsv", "\t") == [["path", "reason"]]
    lines = result.stdout.strip().splitlines()
    assert any(line.split() == ["all", "15", "3", "6", "24"] for line in lines)
    assert lines[-1].startswith("Done: 24 images in 3 labels split 15/3/6")
    assert str(proc / "pairs_test.csv") in result.stdout and "share no image" in result.stdout
    # seeded: a second run writes the same split
    assert _run(work, "tiny").returncode == 0
    assert load_split(proc / "imgFilenamesTest.json") == splits["test"]


def test_planted_duplicates_corrupt_files_and_odd_entries(tiny_dataset, tmp_path):
    shutil.copy(tiny_dataset / "red" / "red_0.jpg", tiny_dataset / "red" / "red_0_copy.jpg")
    with Image.open(tiny_dataset / "green" / "green_3.jpg") as img:  # the same picture as PNG, under another label
        img.save(tiny_dataset / "blue" / "zz_green_3.png")
    data = (tiny_dataset / "green" / "green_1.jpg").read_bytes()
    (tiny_dataset / "green" / "broken.jpg").write_bytes(data[: len(data) // 2])
    make_image(tiny_dataset / "lonely" / "only.jpg", (120, 120, 0), pattern="dots")
    make_image(tiny_dataset / "loose.jpg", (0, 0, 0))
    outside = make_image(tmp_path / "elsewhere" / "out.jpg", (9, 9, 9))
    (tiny_dataset / "red" / "link.jpg").symlink_to(outside)
    (tiny_dataset / "red" / ".DS_Store").write_bytes(b"\0\1")
    work = tiny_dataset.parents[1]
    result = _run(work, "tiny")
    assert result.returncode == 0, result.stderr
    res, proc = work / "results" / "tiny", work / "proc" / "tiny"
    assert _csv(res / "near_duplicates.csv") == [
        ["group", "key", "kept"], ["1", "blue/zz_green_3.png", "yes"], ["1", "green/green_3.jpg", "no"],
        ["2", "red/red_0.jpg", "yes"], ["2", "red/red_0_copy.jpg", "no"]]
    kept = {k for split in SPLITS for v in load_split(proc / f"imgFilenames{split.title()}.json")
            .values() for k in v}
    assert "red/red_0.jpg" in kept and "blue/zz_green_3.png" in kept
    assert not kept & {"red/red_0_copy.jpg", "green/green_3.jpg", "green/broken.jpg", "loose.jpg", "red/link.jpg"}
    assert "lonely/only.jpg" in kept and fileio.load_json(proc / "lutLabel2Id.json")["lonely"] == 2
    skipped = dict(_csv(res / "skipped_images.tsv", "\t")[1:])
    assert set(skipped) == {str(tiny_dataset / n) for n in ("green/broken.jpg", "loose.jpg", "red/link.jpg")}
    assert "truncated" in skipped[str(tiny_dataset / "green" / "broken.jpg")]
    assert skipped[str(tiny_dataset / "loose.jpg")] == "not inside a label folder"
    assert "broken.jpg" in result.stderr and "label 'lonely' has only 1 image" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        "Done: 25 images in 4 labels")  # 24 + png copy + lonely - 2 duplicates
    assert "2 near-duplicate(s) removed, 3 file(s) skipped" in result.stdout

    report_only = _run(work, "tiny", "dedup_enabled=False")
    assert report_only.returncode == 0, report_only.stderr
    assert len(_csv(res / "near_duplicates.csv")) == 5 and "report only" in report_only.stdout
    assert "Done: 27 images in 4 labels" in report_only.stdout


def test_bundled_sample_through_a_symlinked_dataset_folder(tmp_path, sample_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fridge").symlink_to(sample_dir, target_is_directory=True)
    result = _run(tmp_path, "fridge")
    assert result.returncode == 0, result.stderr
    counts = _csv(tmp_path / "results" / "fridge" / "split_counts.csv")
    assert [(row[0], row[4]) for row in counts[1:]] == [("can", "32"), ("carton", "32"), ("milk_bottle", "37"),
                                                        ("water_bottle", "33")]
    for label, train, val, test, total in counts[1:]:
        n_train = int(0.75 * int(total))
        assert (int(val), int(train), int(test)) == (int(0.2 * n_train), n_train - int(0.2 * n_train),
                                                     int(total) - n_train)
    test_sets = load_ranking_sets(tmp_path / "proc" / "fridge" / "imgInfosTest.json")
    assert len(test_sets) == sum(min(20, int(row[3])) for row in counts[1:])
    labels = np.array([label_of(s.query) for s in test_sets])
    assert (labels == "milk_bottle").sum() == 10
    assert "Done: 134 images in 4 labels" in result.stdout and not (tmp_path / "proc" / "fridgeObjects").exists()


def test_split_file_and_its_errors(tiny_dataset):
    work = tiny_dataset.parents[1]
    rows = [f"{p.relative_to(tiny_dataset).as_posix()}\t{'test' if p.stem.endswith(('_0', '_1', '_2')) else 'train'}"
            for p in sorted(tiny_dataset.rglob("*.jpg")) if not p.stem.endswith("_7")]
    (tiny_dataset / "split.tsv").write_text("# my split\n" + "\n".join(rows) + "\n")
    result = _run(work, "tiny", "splitFile=split.tsv", "ratioValFromTrain=0.0")
    assert result.returncode == 0, result.stderr
    test = load_split(work / "proc" / "tiny" / "imgFilenamesTest.json")
    assert test["red"] == ["red/red_0.jpg", "red/red_1.jpg", "red/red_2.jpg"]
    assert "3 image(s) not in the splitFile are left out" in result.stderr
    (tiny_dataset / "split.tsv").write_text("red/red_0.jpg\ttrain\nred/red_1.jpg\tholdout\n")
    bad = _run(work, "tiny", "splitFile=split.tsv")
    assert bad.returncode == 1 and "splitFile row 2 'red/red_1.jpg\\tholdout'" in bad.stderr
    missing = _run(work, "tiny", "splitFile=nope.tsv")
    assert missing.returncode == 2 and "nope.tsv not found" in missing.stderr


def test_groups_file_keeps_groups_together_and_refuses_a_split_file_across_one(tiny_dataset):
    work = tiny_dataset.parents[1]
    keys = [p.relative_to(tiny_dataset).as_posix() for p in sorted(tiny_dataset.rglob("*.jpg"))]
    groups = {key: f"{key.split('/')[0]}{int(key[-5]) // 2}" for key in keys}  # pairs: red_0 and red_1 are red0
    (tiny_dataset / "groups.tsv").write_text("".join(f"{k}\t{g}\n" for k, g in groups.items()))
    result = _run(work, "tiny", "groupsFile=groups.tsv", "ratioValFromTrain=0.5")
    assert result.returncode == 0, result.stderr
    assert "share no image and no group of" in result.stdout
    side = {key: split for split in ("train", "val", "test")
            for keys_ in load_split(work / "proc" / "tiny" / f"imgFilenames{split.title()}.json").values()
            for key in keys_}
    assert all(side[k] == side[j] for k in keys for j in keys if groups[k] == groups[j])
    (tiny_dataset / "split.tsv").write_text("".join(f"{k}\t{'test' if k.endswith('_1.jpg') else 'train'}\n"
                                                    for k in keys))
    bad = _run(work, "tiny", "groupsFile=groups.tsv", "splitFile=split.tsv")
    assert bad.returncode == 1 and "splitFile puts group 'blue0' on both sides" in bad.stderr
    missing = _run(work, "tiny", "groupsFile=nope.tsv")
    assert missing.returncode == 2 and "groupsFile" in missing.stderr and "nope.tsv not found" in missing.stderr


def test_missing_or_empty_data_folder_is_a_one_line_error(tmp_path):
    for name in ("absent", "empty"):
        (tmp_path / "data" / "empty" / "label").mkdir(parents=True, exist_ok=True)
        result = _run(tmp_path, name)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: no images in {tmp_path / 'data' / name}: put them in {tmp_path / 'data' / name}/<label>/ "
            "or run 0_downloadImages.py"]
    assert not (tmp_path / "proc").exists()


def test_help():
    result = run_script(SCRIPT, "--help", timeout=120)
    assert result.returncode == 0 and "near-duplicates" in result.stdout and "--set NAME=VALUE" in result.stdout


def test_only_unreadable_images_is_a_one_line_error(tmp_path):
    (tmp_path / "data" / "bad" / "label").mkdir(parents=True)
    (tmp_path / "data" / "bad" / "label" / "a.jpg").write_bytes(b"not a jpeg")
    result = _run(tmp_path, "bad")
    assert result.returncode == 2 and "error: no readable image in a label folder" in result.stderr
    assert "a.jpg" in (tmp_path / "results" / "bad" / "skipped_images.tsv").read_text()


def test_include_labels(tiny_dataset):
    work = tiny_dataset.parents[1]
    result = _run(work, "tiny", "includeLabels=['red', 'blue']")
    assert result.returncode == 0, result.stderr
    assert fileio.load_json(work / "proc" / "tiny" / "lutLabel2Id.json") == {"blue": 0, "red": 1}
    assert "Done: 16 images in 2 labels" in result.stdout
    unknown = _run(work, "tiny", "includeLabels=['red', 'purple']")
    assert unknown.returncode == 2
    assert "includeLabels ['purple'] not found in" in unknown.stderr and "blue, green, red" in unknown.stderr
    single = _run(work, "tiny", "includeLabels=green", "ratioValFromTrain=0.0", "test_maxNegImgsPerQueryImg=0",
                  "train_maxNegImgsPerQueryImg=0")
    assert single.returncode == 0 and "Done: 8 images in 1 labels" in single.stdout
