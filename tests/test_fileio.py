"""image_similarity.data.fileio: atomic writes land whole, with ordinary permissions, and leave no temporary behind."""
import os
import stat

import pytest

from image_similarity.data import fileio


def test_atomic_write_gives_the_mode_of_an_ordinary_file(tmp_path):
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    written = fileio.atomic_write_text(tmp_path / "out" / "atomic.txt", "hello")
    assert written.read_text() == "hello"
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(ordinary.stat().st_mode)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert sorted(p.name for p in written.parent.iterdir()) == ["atomic.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = fileio.atomic_write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
