"""Splits and ranking sets on synthetic keys, with answers worked out by hand."""
import itertools
import logging

import numpy as np
import pytest

from image_similarity.data.splits import SPLITS, label_of, make_ranking_sets, parse_groups_file, split_images


def _keys(counts):
    return {label: [f"{label}/{label}_{i:03d}.jpg" for i in range(n)] for label, n in counts.items()}


def _flat(split):
    return [key for keys in split.values() for key in keys]


def test_label_of():
    assert label_of("can/can_1.jpg") == "can"
    assert label_of("shirt/leopard/img 3.png") == "shirt"
    with pytest.raises(ValueError, match="no label folder"):
        label_of("loose.jpg")


def test_split_sizes_follow_the_ratios_per_label():
    keys = _keys({"a": 20, "b": 7, "c": 1, "d": 0})
    splits = split_images(keys, 0.75, 0.2, seed=0)
    sizes = {split: {label: len(v) for label, v in splits[split].items()} for split in SPLITS}
    # a: int(.75*20)=15 train units, int(.2*15)=3 of them to val; b: int(5.25)=5 -> 1 val; c: int(.75)=0 train.
    assert sizes == {"train": {"a": 12, "b": 4, "c": 0, "d": 0}, "val": {"a": 3, "b": 1, "c": 0, "d": 0},
                     "test": {"a": 5, "b": 2, "c": 1, "d": 0}}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(_flat(splits[a])) & set(_flat(splits[b]))
    assert sorted(key for split in SPLITS for key in _flat(splits[split])) == sorted(_flat(keys))
    assert all(v == sorted(v) for split in splits.values() for v in split.values())
    assert all(label_of(k) == label for split in splits.values() for label, v in split.items() for k in v)
    no_val = split_images(keys, 0.75, 0.0, seed=0)
    assert _flat(no_val["val"]) == [] and len(_flat(no_val["train"])) == 20


def test_split_is_seeded():
    keys = _keys({"a": 30, "b": 30})
    first = split_images(keys, 0.5, 0.2, seed=3)
    assert split_images(keys, 0.5, 0.2, seed=3) == first
    assert split_images(keys, 0.5, 0.2, seed=np.random.default_rng(3)) == first
    assert split_images(keys, 0.5, 0.2, seed=4) != first
    # the input order does not matter, only the set of keys
    shuffled = {label: list(reversed(v)) for label, v in reversed(list(keys.items()))}
    assert split_images(shuffled, 0.5, 0.2, seed=3) == first


def test_subdir_split_keeps_subfolders_whole():
    keys = {"shirt": [f"shirt/{sub}/{i}.jpg" for sub in "pqrstuvw" for i in range(4)] + ["shirt/loose.jpg"],
            "dress": [f"dress/{sub}/{i}.jpg" for sub in "xyz" for i in range(3)]}
    splits = split_images(keys, 0.5, 0.25, split_by="subdir", seed=1)
    where = {}
    for split in SPLITS:
        for key in _flat(splits[split]):
            unit = key.rsplit("/", 1)[0] if key.count("/") == 2 else key
            where.setdefault(unit, set()).add(split)
    assert all(len(s) == 1 for s in where.values()), where
    # shirt: 9 units -> int(4.5)=4 train units -> int(1.0)=1 of them to val; dress: 3 units -> 1 train, 0 val
    n_units = {split: len({k.rsplit("/", 1)[0] if k.count("/") == 2 else k for k in splits[split]["shirt"]})
               for split in SPLITS}
    assert n_units == {"train": 3, "val": 1, "test": 5}
    assert len(splits["train"]["dress"]) == 3 and splits["val"]["dress"] == [] and len(splits["test"]["dress"]) == 6
    by_file = split_images(keys, 0.5, 0.25, split_by="filename", seed=1)
    assert len(by_file["train"]["shirt"]) + len(by_file["val"]["shirt"]) == int(0.5 * 33)


def test_split_file_replaces_the_random_split(caplog):
    keys = _keys({"a": 10, "b": 10})
    rows = [[f"a/a_{i:03d}.jpg", "train"] for i in range(6)] + [[f"a/a_{i:03d}.jpg", "TEST "] for i in (6, 7)]
    rows += [[f"b/b_{i:03d}.jpg", "test"] for i in range(10)] + [["a/a_000.jpg", "train"]]  # a repeat agrees
    with caplog.at_level(logging.WARNING):
        splits = split_images(keys, 0.75, 0.5, split_file_rows=rows, seed=0)
    assert splits["test"] == {"a": ["a/a_006.jpg", "a/a_007.jpg"], "b": sorted(keys["b"])}
    assert len(splits["val"]["a"]) == 3 and len(splits["train"]["a"]) == 3
    assert sorted(splits["val"]["a"] + splits["train"]["a"]) == [f"a/a_{i:03d}.jpg" for i in range(6)]
    assert splits["train"]["b"] == splits["val"]["b"] == []
    assert "2 image(s) not in the splitFile are left out: a/a_008.jpg, a/a_009.jpg" in caplog.text
    # the seed only picks which train images go to validation
    assert split_images(keys, 0.1, 0.5, split_file_rows=rows, seed=0)["test"] == splits["test"]


@pytest.mark.parametrize("bad_row, message", [
    (["a/a_000.jpg", "validation"], r"row 2 'a/a_000.jpg\\tvalidation': split must be 'train' or 'test'"),
    (["a/nope.jpg", "train"], r"row 2 .*no image 'a/nope.jpg' under the image folder"),
    (["a/a_001.jpg", "test"], r"row 2 .*a/a_001.jpg is listed as both train and test"),
    (["a/a_002.jpg"], r"row 2 'a/a_002.jpg': expected 2 tab-separated columns"),
])
def test_split_file_errors_name_the_row(bad_row, message):
    rows = [["a/a_001.jpg", "train"], bad_row]
    with pytest.raises(ValueError, match=message):
        split_images(_keys({"a": 4}), 0.75, 0.0, split_file_rows=rows)


def test_split_file_rows_for_excluded_images_are_ignored():
    keys = _keys({"a": 4})
    removed = keys["a"].pop()  # a near-duplicate removed before splitting
    rows = [[k, "train"] for k in keys["a"]] + [[removed, "test"], ["a\\a_000.jpg", "train"]]
    splits = split_images(keys, 0.75, 0.0, split_file_rows=rows, excluded_keys={removed})
    assert splits["train"]["a"] == keys["a"] and splits["test"]["a"] == []


def test_groups_stay_on_one_side_of_a_random_split():
    keys = _keys({"a": 12, "b": 8})
    # a: four objects of three photos each; b: two of four.
    rows = [[f"a/a_{i:03d}.jpg", f"obj{i // 3}"] for i in range(12)] + [[f"b/b_{i:03d}.jpg", f"bag{i // 4}"]
                                                                         for i in range(8)]
    for seed in range(5):
        splits = split_images(keys, 0.5, 0.5, seed=seed, group_file_rows=rows)
        side = {key: split for split in SPLITS for key in _flat(splits[split])}
        for group in {g for _, g in rows}:
            assert len({side[k] for k, g in rows if g == group}) == 1, (seed, group)
        # Units are groups: a has 4 -> int(0.5*4)=2 train units -> int(0.5*2)=1 to val; b has 2 -> 1 -> 0.
        assert [len(splits[split]["a"]) for split in SPLITS] == [3, 3, 6]
        assert [len(splits[split]["b"]) for split in SPLITS] == [4, 0, 4]
    # Without groups the same settings split images one by one.
    assert [len(split_images(keys, 0.5, 0.5, seed=0)[split]["a"]) for split in SPLITS] == [3, 3, 6]
    assert [len(split_images(keys, 0.5, 0.5, seed=0)[split]["b"]) for split in SPLITS] == [2, 2, 4]


def test_a_split_file_that_puts_a_group_on_both_sides_is_refused():
    keys = _keys({"a": 4})
    groups = [["a/a_000.jpg", "mug"], ["a/a_001.jpg", "mug"], ["a/a_002.jpg", "cup"]]
    split_rows = [["a/a_000.jpg", "train"], ["a/a_001.jpg", "test"], ["a/a_002.jpg", "train"], ["a/a_003.jpg", "test"]]
    with pytest.raises(ValueError, match="splitFile puts group 'mug' on both sides: a/a_000.jpg in train, "
                                         "a/a_001.jpg in test"):
        split_images(keys, 0.75, 0.0, split_file_rows=split_rows, group_file_rows=groups)
    split_rows[1][1] = "train"
    splits = split_images(keys, 0.75, 0.0, split_file_rows=split_rows, group_file_rows=groups)
    assert splits["train"]["a"] == keys["a"][:3] and splits["test"]["a"] == ["a/a_003.jpg"]


@pytest.mark.parametrize("bad_row, message", [
    (["a/nope.jpg", "x"], r"groupsFile row 2 .*no image 'a/nope.jpg'"),
    (["a/a_001.jpg", "y"], r"row 2 .*a/a_001.jpg is listed in groups 'x' and 'y'"),
    (["b/b_000.jpg", "x"], r"row 2 .*group 'x' holds images of labels 'a' and 'b'"),
    (["a/a_002.jpg"], r"row 2 'a/a_002.jpg': expected 2 tab-separated columns"),
])
def test_groups_file_errors_name_the_row(bad_row, message):
    keys = _keys({"a": 4, "b": 2})
    with pytest.raises(ValueError, match=message):
        split_images(keys, 0.75, 0.0, group_file_rows=[["a/a_001.jpg", "x"], bad_row])
    assert parse_groups_file([["a/a_001.jpg", " x "], ["a\\a_002.jpg", "x"]]) == {"a/a_001.jpg": "x",
                                                                                "a/a_002.jpg": "x"}


@pytest.mark.parametrize("kwargs, message", [
    ({"split_by": "folder"}, "imagesSplitBy must be 'filename' or 'subdir'"),
    ({"ratio_train": 1.5}, r"ratioTrainTest must be in \[0, 1\]"),
    ({"ratio_val": 1.0}, r"ratioValFromTrain must be in \[0, 1\)"),
])
def test_bad_split_settings_are_refused(kwargs, message):
    args = {"ratio_train": 0.75, "ratio_val": 0.2, **kwargs}
    with pytest.raises(ValueError, match=message):
        split_images(_keys({"a": 4}), **args)


def test_ranking_set_sizes_match_the_tutorial_settings():
    keys = _keys({f"label{i:02d}": 150 for i in range(11)})
    train = make_ranking_sets(keys, 100, 100, np.random.default_rng(0))
    test = make_ranking_sets(keys, 20, 100, np.random.default_rng(0))
    assert len(train) == 1100 and len(test) == 220
    assert {len(s.references) for s in train + test} == {101}
    assert {len(s.negatives) for s in train + test} == {100}
    small = make_ranking_sets(_keys({"a": 5, "b": 3}), 20, 7, 0)
    assert len(small) == 8 and {len(s.references) for s in small} == {8}


def test_ranking_sets_contents():
    keys = _keys({"a": 12, "b": 6, "single": 1, "empty": 0})
    sets = make_ranking_sets(keys, 10, 30, np.random.default_rng(5))
    queries = [s.query for s in sets]
    assert len(queries) == len(set(queries)) == 10 + 6  # single-image and empty labels give no query
    assert {label_of(q) for q in queries} == {"a", "b"}
    negative_labels = set()
    for s in sets:
        label = label_of(s.query)
        assert s.positive != s.query and label_of(s.positive) == label
        assert all(label_of(n) != label for n in s.negatives)
        negative_labels |= {label_of(n) for n in s.negatives}
        assert sorted(s.references) == sorted([s.positive, *s.negatives])
        assert s.is_positive.dtype == bool and s.is_positive.shape == (31,)
        assert s.is_positive.sum() == 1 and s.references[int(np.argmax(s.is_positive))] == s.positive
    assert negative_labels == {"a", "b", "single"}  # a single image can be a negative, an empty label cannot
    assert len({int(np.argmax(s.is_positive)) for s in sets}) > 5  # references are shuffled: the positive moves


def test_ranking_sets_are_seeded():
    keys = _keys({"a": 9, "b": 9, "c": 9})
    first = make_ranking_sets(keys, 5, 10, np.random.default_rng(11))
    assert make_ranking_sets(keys, 5, 10, 11) == first
    assert make_ranking_sets(keys, 5, 10, 12) != first


def test_negative_labels_are_drawn_uniformly_not_by_image_count():
    keys = _keys({"a": 2, "big": 1000, "c": 2})
    sets = make_ranking_sets(keys, 2, 1000, np.random.default_rng(0))
    from_a = [n for s in sets if label_of(s.query) == "a" for n in s.negatives]
    share_c = np.mean([label_of(n) == "c" for n in from_a])
    assert len(from_a) == 2000 and 0.45 < share_c < 0.55  # image-uniform sampling would give about 0.002
    positives = {s.query: s.positive for s in sets if label_of(s.query) == "a"}
    assert positives == {"a/a_000.jpg": "a/a_001.jpg", "a/a_001.jpg": "a/a_000.jpg"}


def test_a_lone_label_has_no_negatives_to_draw():
    with pytest.raises(ValueError, match="'a' is the only label with images"):
        make_ranking_sets(_keys({"a": 3, "b": 0}), 5, 1, 0)
    sets = make_ranking_sets(_keys({"a": 3}), 5, 0, 0)
    assert len(sets) == 3 and all(len(s.references) == 1 and s.is_positive.all() for s in sets)
