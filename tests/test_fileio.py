"""image_similarity.data.fileio: atomic writes land whole, with ordinary permissions, and leave no temporary behind."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

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


WRITER = """
import sys, time
from image_similarity.data import fileio
with fileio.atomic_path(sys.argv[1]) as tmp:
    with open(tmp, "w") as handle:
        handle.write(sys.argv[2])
        handle.flush()
        print("writing", flush=True)
        time.sleep(float(sys.argv[3]))
        handle.write(sys.argv[2])
"""


def test_two_processes_writing_one_output_both_finish_and_the_file_is_whole(tmp_path):
    target = tmp_path / "out.txt"
    slow = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "a" * 1000, "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert slow.stdout.readline() == "writing\n"
    fast = subprocess.run([sys.executable, "-c", WRITER, str(target), "b" * 1000, "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert fast.returncode == 0, fast.stderr
    assert target.read_text() == "b" * 2000
    _, stderr = slow.communicate(timeout=30)
    assert slow.returncode == 0, stderr  # its temporary file was not taken away by the second writer
    assert target.read_text() == "a" * 2000  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_temporaries_of_dead_writers_are_removed_and_of_live_ones_kept(tmp_path):
    target = tmp_path / "out.txt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_by_dead = tmp_path / f".out.txt.{dead.stdout.strip()}.abc123.tmp"
    old_style = tmp_path / ".out.txt.k9x2ab.tmp"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        of_live = tmp_path / f".out.txt.{live.pid}.xyz789.tmp"
        for path in (left_by_dead, old_style, of_live):
            path.write_text("half")
        fileio.atomic_write_text(target, "done")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.txt", of_live.name])
    finally:
        live.kill()
        live.wait()


def test_a_full_disk_names_the_output(tmp_path):
    # /dev/full fails every write with ENOSPC, like a full disk; the error must say which output it was.
    target = tmp_path / "features.npy"
    with pytest.raises(OSError) as info:
        with fileio.atomic_path(target), open("/dev/full", "wb") as full:
            full.write(b"x" * 100_000)
            full.flush()
    assert str(info.value).startswith(f"{target}: cannot write: ") and info.value.errno == 28
    assert "No space left on device" in str(info.value)
    # numpy's own message ("N requested and M written") names no file either
    with pytest.raises(OSError, match=rf"^{target}: cannot write: "):
        with fileio.atomic_path(target), open("/dev/full", "wb", buffering=0) as full:
            np.arange(200_000, dtype=np.float32).tofile(full)
    assert list(tmp_path.iterdir()) == []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
