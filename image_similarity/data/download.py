"""Download a ``label<TAB>url`` list into ``<out_dir>/<label>/<n>.jpg``: concurrent, retried, checked, resumable.

Every body must decode through :func:`image_similarity.images.read_image` (error pages and HTML are refused),
is capped in size and in time while it streams, and is written atomically, so an interrupted run leaves only
finished files and a re-run skips them. Downloads run in daemon threads: Ctrl-C stops a run at once, even with
a connection stuck mid-body. ``n`` is the 1-based position of the URL among its label's lines, so names stay stable.
"""
import io
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import NamedTuple
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from .. import __version__
from .fileio import atomic_path, atomic_write_bytes, remove_stale_temporaries, save_csv
from .images import ImageReadError, read_image

__all__ = ["UrlEntry", "Failure", "DownloadReport", "check_label", "read_url_list", "make_session",
           "download_images", "save_failures"]

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset(range(500, 600))  # 4xx are the client's fault: never retried
RETRY_AFTER_MAX_SEC = 60                     # a server's Retry-After is honoured up to this many seconds
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95                            # for non-JPEG bodies, re-encoded once
CHUNK_BYTES = 64 * 1024


def check_label(label):
    """Raise ValueError unless ``label`` is a plain folder name (no path separators, not '.', '..' or hidden)."""
    if not label:
        raise ValueError("empty label")
    if any(sep in label for sep in "/\\\0") or PureWindowsPath(label).drive:
        raise ValueError(f"label {label!r} is not a plain folder name (contains a path separator or drive)")
    if label.startswith("."):
        raise ValueError(f"label {label!r} is not a plain folder name ('.', '..' and hidden names are refused)")
    return label


def _check_url(url):
    if not url:
        raise ValueError("empty url")
    if any(char.isspace() for char in url):
        raise ValueError(f"url {url!r} contains whitespace (a third column?)")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url {url!r} is not an http(s) URL")
    return url


class UrlEntry(NamedTuple):
    """One usable line of a URL list: saved as ``<label>/<index>.jpg``; ``line`` is its 1-based line number."""

    label: str
    url: str
    index: int
    line: int = 0

    @property
    def relpath(self):
        return f"{self.label}/{self.index}.jpg"


class Failure(NamedTuple):
    """A URL that gave no image (or a line that was refused), with the reason; one row of the failures TSV."""

    url: str
    label: str
    reason: str


@dataclass
class DownloadReport:
    """What a run did, per URL: newly saved, already present (and valid), or failed with a reason."""

    downloaded: list = field(default_factory=list)  # UrlEntry
    present: list = field(default_factory=list)     # UrlEntry
    failed: list = field(default_factory=list)      # Failure

    @property
    def n_total(self):
        return len(self.downloaded) + len(self.present) + len(self.failed)

    def summary(self):
        return (f"downloaded {len(self.downloaded)}, already present {len(self.present)}, "
                f"failed {len(self.failed)} of {self.n_total}")


def read_url_list(path):
    """Read a ``label<TAB>url`` file; blank lines and ``#`` comments are ignored.

    Each label's lines are numbered 1, 2, … in file order (refused URLs keep their number, so fixing one
    line never renames the files of the others). A repeated ``(label, url)`` is refused as a duplicate.

    Returns
    -------
    entries : list of UrlEntry
        The usable lines, in file order.
    rejected : list of Failure
        The refused lines; each reason starts with ``path:line:``.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    entries, rejected, counts, seen = [], [], {}, {}
    for line_no, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        label, sep, url = text.partition("\t")
        label, url = label.strip(), url.strip()
        try:
            if not sep:
                raise ValueError("no tab: expected label<TAB>url")
            check_label(label)
            counts[label] = counts.get(label, 0) + 1
            _check_url(url)
            if (label, url) in seen:
                raise ValueError(f"duplicate of line {seen[label, url]}")
        except ValueError as err:
            rejected.append(Failure(url, label, f"{path}:{line_no}: {err}"))
            continue
        seen[label, url] = line_no
        entries.append(UrlEntry(label, url, counts[label], line_no))
    return entries, rejected


def make_session(max_retries=3, backoff=0.5, pool_size=8):
    """A requests Session retrying timeouts, connection errors and 5xx (never 4xx) with exponential back-off.

    Parameters
    ----------
    max_retries : int
        Retries after the first attempt; 0 = none.
    backoff : float
        Seconds; the waits before the retries are 0, 2*backoff, 4*backoff, …
    pool_size : int
        Connections kept per host (one per worker thread).
    """
    retry = Retry(total=max_retries, connect=max_retries, read=max_retries, status=max_retries,
                  backoff_factor=backoff, status_forcelist=RETRY_STATUSES, allowed_methods={"GET"},
                  raise_on_status=False, retry_after_max=RETRY_AFTER_MAX_SEC)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.max_redirects = 10
    session.headers["User-Agent"] = f"image-similarity/{__version__} {requests.utils.default_user_agent()}"
    return session


def _is_valid_image(path, max_pixels):
    try:
        read_image(path, max_pixels=max_pixels)
        return True
    except ImageReadError:
        return False


def _cause(err):
    """The useful part of a requests error: urllib3 wraps the last error of the retries in MaxRetryError.reason."""
    cause = err.args[0] if err.args else err
    return getattr(cause, "reason", None) or cause


def _fetch_body(session, url, timeout, max_bytes, deadline, stop):
    """The response body as bytes, or a ValueError with the reason (bad status, too large, too slow, network error).

    ``deadline`` is a ``time.monotonic()`` value (or None): the body is read as it arrives (``read1``), so a server
    that trickles bytes, each within ``timeout``, is cut off there. ``stop`` (a threading.Event) ends the read too.
    """
    try:
        with session.get(url, timeout=timeout, stream=True) as response:
            if response.status_code >= 400:
                retried = " (after retries)" if response.status_code in RETRY_STATUSES else ""
                raise ValueError(f"HTTP {response.status_code} {response.reason}{retried}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"body of {int(declared):,} bytes is over the {max_bytes:,}-byte limit")
            body = bytearray()
            try:
                while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                    body += chunk
                    if len(body) > max_bytes:
                        raise ValueError(f"body is over the {max_bytes:,}-byte limit (stopped reading)")
                    if deadline is not None and time.monotonic() > deadline:
                        raise ValueError(f"over the per-URL deadline ({len(body):,} bytes received): server too slow")
                    if stop.is_set():
                        raise ValueError("interrupted")
            except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
                # not retried: the adapter's retries end with the headers
                raise ValueError(f"body cut off: {_cause(err)}") from None
            return bytes(body)
    except requests.TooManyRedirects:
        raise ValueError("too many redirects (redirect loop?)") from None
    except requests.RequestException as err:
        raise ValueError(f"request failed: {_cause(err)}") from None


def _download_one(session, entry, out_dir, limits, stop):
    """Fetch one entry into ``out_dir``; returns 'downloaded' or 'present', or raises ValueError with the reason.

    A write error (disk full, read-only folder) is an OSError naming the file: it stops the run.
    """
    target = Path(out_dir) / entry.label / f"{entry.index}.jpg"
    remove_stale_temporaries(target)  # a kill -9 during a write leaves atomic_path's temporary file
    if target.exists():
        if _is_valid_image(target, limits.max_pixels):
            return "present"
        logger.warning("%s exists but does not decode: downloading it again", target)
    deadline = time.monotonic() + limits.deadline if limits.deadline else None
    body = _fetch_body(session, entry.url, limits.timeout, limits.max_bytes, deadline, stop)
    try:
        image = read_image(io.BytesIO(body), max_pixels=limits.max_pixels)
    except ImageReadError as err:
        raise ValueError(f"not a usable image ({len(body):,} bytes): {err.reason}") from None
    if body.startswith(JPEG_MAGIC):
        atomic_write_bytes(target, body)  # keep the original bytes, EXIF orientation included
    else:
        with atomic_path(target) as tmp:
            image.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    return "downloaded"


class _Limits(NamedTuple):
    timeout: float
    max_bytes: int
    deadline: float
    max_pixels: int


def _in_daemon_threads(task, items, n_workers, stop):
    """Yield ``(index, result, exception)`` as ``task(item)`` finishes for each item, in any order.

    Daemon threads, not a ThreadPoolExecutor: the interpreter joins an executor's threads at exit, so a Ctrl-C
    would wait for a stuck connection; daemon threads are dropped, and a killed write leaves only a temporary file
    that the next run removes. Setting ``stop`` makes the workers take no new item.
    """
    todo, done = queue.SimpleQueue(), queue.SimpleQueue()
    for pair in enumerate(items):
        todo.put(pair)

    def work():
        while not stop.is_set():
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, task(item), None))
            except Exception as err:  # handed to the caller, which decides what stops the run
                done.put((i, None, err))

    for _ in range(min(n_workers, len(items))):
        threading.Thread(target=work, daemon=True).start()
    for _ in range(len(items)):
        yield done.get()


def download_images(entries, out_dir, n_workers=8, timeout=10.0, max_retries=3, max_bytes=20_000_000,
                    backoff=0.5, session=None, progress=True, deadline=120.0, max_pixels=40_000_000):
    """Download every entry to ``<out_dir>/<label>/<index>.jpg``, skipping targets that already decode.

    Parameters
    ----------
    entries : list of UrlEntry
        From :func:`read_url_list`. Labels are checked again here, and two entries may not share a target.
    out_dir : str or Path
        The dataset folder, usually ``data/<datasetName>``.
    n_workers : int
        Concurrent downloads (threads).
    timeout : float
        Seconds to connect, and between bytes received.
    deadline : float
        Most seconds for one URL's body to arrive in all, however steadily it trickles; 0 = no deadline.
    max_retries : int
        Retries on timeouts, connection errors and 5xx; 4xx are never retried. Ignored when ``session`` is given.
    max_bytes : int
        Largest accepted body in bytes; longer bodies are refused without reading them whole.
    backoff : float
        Back-off factor in seconds (see :func:`make_session`). Ignored when ``session`` is given.
    session : requests.Session, optional
        Used as is (shared by the threads); None = :func:`make_session`.
    progress : bool
        Show a tqdm bar.
    max_pixels : int
        Largest accepted image in pixels (width x height), checked from the header before decoding.

    Returns
    -------
    DownloadReport
        Lists in the order of ``entries``.
    """
    entries = list(entries)
    for entry in entries:
        check_label(entry.label)
    repeated = sorted(relpath for relpath, n in Counter(e.relpath for e in entries).items() if n > 1)
    if repeated:
        raise ValueError(f"several entries would be saved as {', '.join(repeated)}")
    session = session or make_session(max_retries, backoff, pool_size=n_workers)
    limits, stop, outcomes = _Limits(timeout, max_bytes, deadline, max_pixels), threading.Event(), {}
    finished = _in_daemon_threads(lambda entry: _download_one(session, entry, out_dir, limits, stop), entries,
                                  n_workers, stop)
    try:
        for i, outcome, err in tqdm(finished, total=len(entries), desc="download", unit="url", disable=not progress):
            if isinstance(err, ValueError):
                outcome = Failure(entries[i].url, entries[i].label, str(err))
                logger.debug("failed %s (%s): %s", entries[i].url, entries[i].relpath, err)
            elif err is not None:
                raise err
            outcomes[i] = outcome
    finally:
        stop.set()  # on Ctrl-C or a disk error, the workers start nothing new and cut their reads
    report = DownloadReport()
    for i, entry in enumerate(entries):
        outcome = outcomes[i]
        if isinstance(outcome, Failure):
            report.failed.append(outcome)
        else:
            (report.downloaded if outcome == "downloaded" else report.present).append(entry)
    return report


def save_failures(path, failures):
    """Write ``url<TAB>label<TAB>reason`` rows atomically, with a header row even when there are none."""
    return save_csv(path, ["url", "label", "reason"], failures, delimiter="\t")
