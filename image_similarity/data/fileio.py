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
           "json_text", "save_json", "load_json", "save_csv", "read_tsv", "save_npy"]

# Every pickle protocol from 2 on starts with the PROTO opcode: how a file of an older version of this project begins.
PICKLE_MAGIC = b"\x80"


class _WriteError(OSError):
    """A failed write whose message names the output."""


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Several processes may write the same destination at once: each has its own temporary file (named with its
    process id), and the last to finish wins with a complete file.

    Parameters
    ----------
    path : str or Path
        The destination. Its folder is created if needed. Temporary files left beside it by a killed earlier
        write of the same destination are removed first (never those of a writer still running).

    Raises
    ------
    OSError
        When writing fails (disk full, quota, I/O error): the message names ``path``, and the earlier ``path``, if
        any, is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as err:
        if isinstance(err, _WriteError) or str(path) in str(err):
            raise  # already names its file (an atomic_path nested in this one)
        # ENOSPC and numpy's "N requested and M written" name no file: say which output failed.
        named = _WriteError(f"{path}: cannot write: {err.strerror or err}")
        named.errno = err.errno
        raise named from err
    finally:
        tmp.unlink(missing_ok=True)


def _writer_pid(temporary, path):
    """The process id in the name of an :func:`atomic_path` temporary file of ``path``, or None."""
    pid = temporary.name[len(path.name) + 2:].split(".", 1)[0]
    return int(pid) if pid.isdecimal() else None


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path):
    """Delete the temporary files that a process killed while writing ``path`` left beside it.

    A temporary file whose writer (the process id in its name) is still running is left alone.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = _writer_pid(stale, path)
        if pid is not None and _is_running(pid):
            continue  # a live writer, or this process's own (threads share the pid)
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


def json_text(obj):
    """``obj`` as the indented JSON text every ``.json`` artefact holds."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def save_json(path, obj):
    return atomic_write_text(path, json_text(obj))


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
