"""Near-duplicates, part 3: move all but the kept image of each group away, through a journal (never deleting).

A run killed at any point and re-run completes the journalled plan, so no file is lost or moved twice.
"""
import csv
import logging
import os
import shutil
from pathlib import Path

from ..data.fileio import atomic_path

__all__ = ["JOURNAL_NAME", "check_destination", "move_duplicates"]

logger = logging.getLogger(__name__)

JOURNAL_NAME = "moved.tsv"   # in the --move-duplicates folder: one "source<TAB>destination" line per move


def _same_file(a, b):
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


def _finish_move(source, destination):
    """Complete one journalled move; True when ``destination`` holds the file and ``source`` is gone."""
    if destination.exists() and not source.exists():
        return True
    if source.exists() and destination.exists():
        if not _same_file(source, destination):
            logger.warning("not moving %s: %s exists and differs", source, destination)
            return False
        source.unlink()   # a copy across file systems finished before the kill: the file is at its destination
        return True
    if not source.exists():
        logger.warning("cannot move %s: the file is gone", source)
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, destination)   # atomic on one file system
    except OSError:
        with atomic_path(destination) as tmp:   # across file systems: a complete copy appears atomically
            shutil.copy2(source, tmp)
        source.unlink()
    return True


def check_destination(folder, destination):
    """Create ``destination`` if needed; ValueError unless it lies outside ``folder`` and can be written into.

    Called before any work, so a bad destination is refused before hours of hashing.
    """
    folder, destination = Path(folder), Path(destination)
    if destination.resolve() == folder.resolve() or folder.resolve() in destination.resolve().parents:
        raise ValueError(f"{destination} must lie outside {folder}, or a re-run would scan the moved files")
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{destination}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(destination, os.W_OK | os.X_OK):
        raise ValueError(f"{destination}: not writable")


def move_duplicates(groups, folder, destination):
    """Move every duplicate (never the kept image) from ``folder`` to the same relative path under ``destination``.

    The whole plan is first appended to the journal ``destination/moved.tsv`` and synced; then each file is moved
    by an atomic rename. A run killed at any point and re-run first completes the journalled plan, so no file is
    lost or moved twice. Images of an ``against`` set (absolute keys) are not touched.

    Returns
    -------
    list of (Path, Path)
        The moves done or completed by this call.

    Raises
    ------
    ValueError
        For a destination inside ``folder`` or one that cannot be written into (:func:`check_destination`).
    OSError
        When a move fails (a full destination file system): the message names the file; the journal lets a re-run
        finish.
    """
    folder, destination = Path(folder), Path(destination)
    check_destination(folder, destination)
    journal = destination / JOURNAL_NAME
    plan = []
    if journal.exists():
        with open(journal, encoding="utf-8", newline="") as handle:
            plan = [tuple(map(Path, row)) for row in csv.reader(handle, delimiter="\t") if len(row) == 2]
    new = [(folder / key, destination / key) for group in groups for key, _ in group[1:]
           if not Path(key).is_absolute()]
    journalled = set(plan)
    new = [(source, target) for source, target in new if source.exists() and (source, target) not in journalled]
    for source, target in [move for move in new if move[1].exists()]:
        logger.warning("not moving %s: %s already exists and is not in %s", source, target, journal)
        new.remove((source, target))
    with open(journal, "a", encoding="utf-8", newline="") as handle:
        handle.writelines(f"{source}\t{target}\n" for source, target in new)
        handle.flush()
        os.fsync(handle.fileno())
    done = []
    for source, target in plan + new:
        if source.exists() and _finish_move(source, target):
            done.append((source, target))
    return done

