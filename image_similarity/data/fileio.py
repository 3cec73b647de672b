"""Atomic writes and the small readers and writers every step shares.

A file is first written next to its destination under a temporary name, flushed to disk, then renamed over the
destination, so a crash or a kill never leaves a half-written file that looks finished.
"""
import csv
import glob
import io
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# mkstemp creates its file 0600; a finished file gets the mode open() would have given it under the umask.
_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = ["atomic_path", "remove_stale_temporaries", "atomic_write_bytes", "atomic_write_text", "refuse_pickle",
           "save_json", "load_json", "save_csv", "read_tsv", "save_npy"]

# Every pickle protocol from 2 on starts with the PROTO opcode: how a file of an older version of this project begins.
PICKLE_MAGIC = b"\x80"


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Parameters
    ----------
    path : str or Path
        The destination. Its folder is created if needed. Temporary files left beside it by a killed earlier
        write of the same destination are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path):
    """Delete the temporary files that a process killed while writing ``path`` left beside it."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        logger.info("removing %s, left by an interrupted write", stale)
        stale.unlink(missing_ok=True)


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text):
    return atomic_write_bytes(path, text.encode("utf-8"))


def refuse_pickle(data, source, written_by):
    """Raise a ValueError naming ``source`` when ``data`` is a pickle: older versions wrote them, and unpickling a
    file can run any code, so none is ever read; ``written_by`` (e.g. "1_prepareData.py") writes the new format."""
    if data[:1] == PICKLE_MAGIC:
        raise ValueError(f"{source} is a pickle, from an older version of this project (never read: unpickling can "
                         f"run code): run {written_by} again")


def save_json(path, obj):
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def load_json(path, written_by=None):
    """Parse a JSON file; with ``written_by``, a pickle or a file that is not JSON is a ValueError naming the file
    and the script that writes it."""
    data = Path(path).read_bytes()
    if written_by is None:
        return json.loads(data.decode("utf-8"))
    refuse_pickle(data, path, written_by)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file written by {written_by} ({err}): run it again") from None


def save_csv(path, header, rows, delimiter=","):
    """Write a header and rows as CSV (or TSV with ``delimiter='\\t'``), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def read_tsv(path):
    """Rows of a tab-separated file as lists of strings, skipping blank lines and ``#`` comments."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [row for row in csv.reader(handle, delimiter="\t") if row and not row[0].startswith("#")]


def save_npy(path, array):
    """``np.save`` atomically; the result can be opened with ``np.load(path, mmap_mode='r')``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
    return Path(path)
