"""image_similarity.data.download and 0_downloadImages.py against a real HTTP server on 127.0.0.1.

The server (http.server in a thread) serves good and bad images, errors, slow and endless bodies, and counts
the requests per path so the tests can prove what was retried and what was not.
"""
import io
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_image, run_script
from image_similarity.data.download import (DownloadReport, UrlEntry, check_label, download_images, read_url_list,
                                       save_failures)
from image_similarity.data.images import read_image

TIMEOUT = 0.5      # client timeout in these tests, seconds
SLOW = 1.5         # server delay on the slow routes, seconds (> TIMEOUT)
RETRIES = 2
CAP = 100_000      # body cap in these tests, bytes
FAST = dict(n_workers=4, timeout=TIMEOUT, max_retries=RETRIES, max_bytes=CAP, backoff=0.01, progress=False)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """Real image bytes made with Pillow: a small JPEG, a PNG, and a larger JPEG to truncate."""
    folder = tmp_path_factory.mktemp("payloads")
    big = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG", quality=90)
    return {"jpg": make_image(folder / "good.jpg", (200, 40, 40), pattern="stripes").read_bytes(),
            "png": make_image(folder / "good.png", (30, 40, 200), pattern="dots").read_bytes(),
            "big_jpg": buffer.getvalue()}


def _send(handler, status, body=b"", content_type="image/jpeg", headers=(), length=True):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def _stall(handler, body):
    """Headers and half the body, then silence longer than the client's timeout."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[:len(body) // 2])
    handler.wfile.flush()
    time.sleep(SLOW)
    handler.wfile.write(body[len(body) // 2:])


def _endless(handler, server):
    """A body without Content-Length that goes on for 100 MB unless the client hangs up; counts what was sent."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    chunk = b"\xff" * 65536
    for _ in range(1600):
        handler.wfile.write(chunk)
        server.sent += len(chunk)


def _dribble(handler, body, interval=0.2):
    """A byte every ``interval`` seconds (well within the client's per-read timeout), for as long as it takes."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(interval)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients hanging up on slow or endless bodies are expected here


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            hit = server.hits[self.path]
        server.route(self, hit)

    def log_message(self, *args):
        pass


def _serve(route):
    server = _Server(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.lock, server.hits, server.sent, server.route = threading.Lock(), Counter(), 0, route
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


@pytest.fixture
def server(payloads):
    def route(handler, hit):
        path, jpg = handler.path, payloads["jpg"]
        if path in ("/good.jpg", "/good2.jpg"):
            _send(handler, 200, jpg)
        elif path == "/good.png":
            _send(handler, 200, payloads["png"], "image/png")
        elif path == "/flaky.jpg":
            _send(handler, 500, b"busy", "text/plain") if hit == 1 else _send(handler, 200, jpg)
        elif path == "/always500":
            _send(handler, 500, b"broken", "text/plain")
        elif path == "/slow.jpg":
            time.sleep(SLOW)
            _send(handler, 200, jpg)
        elif path == "/stall.jpg":
            _stall(handler, payloads["big_jpg"])
        elif path == "/truncated.jpg":
            _send(handler, 200, payloads["big_jpg"][:len(payloads["big_jpg"]) * 2 // 3])
        elif path == "/page.html":
            _send(handler, 200, b"<html><body><h1>Sorry, this image was removed</h1></body></html>", "text/html")
        elif path == "/loop":
            _send(handler, 302, headers=[("Location", "/loop")])
        elif path == "/to-good":
            _send(handler, 301, headers=[("Location", "/good.jpg")])
        elif path == "/large-good.jpg":
            _send(handler, 200, payloads["big_jpg"])
        elif path == "/big.jpg":
            _send(handler, 200, payloads["big_jpg"] + b"\0" * CAP)
        elif path == "/endless.jpg":
            _endless(handler, handler.server)
        elif path == "/dribble.jpg":
            _dribble(handler, jpg)
        else:
            _send(handler, 404, b"not found", "text/plain")

    srv = _serve(route)
    yield srv
    srv.shutdown()
    srv.server_close()


def _write_urls(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _entries(server, *paths, label="things"):
    return [UrlEntry(label, server.url + p, i) for i, p in enumerate(paths, 1)]


def _leftovers(root):
    """Temporary or hidden files anywhere under root (what a non-atomic write or a crash would leave)."""
    return sorted(str(p) for p in Path(root).rglob(".*"))


# ---------------------------------------------------------------- reading the URL list

def test_read_url_list_numbers_each_labels_lines_and_refuses_bad_ones(tmp_path):
    urls = tmp_path / "urls.tsv"
    urls.write_bytes("# a comment\n\ncat\thttp://a/1.jpg\r\ndog\thttps://b/1.png\n   \ncat\thttp://a/2.jpg\n"
                     "cat\tftp://a/3.jpg\ncat\thttp://a/4.jpg\n../up\thttp://a/5.jpg\n.\thttp://a/6.jpg\n"
                     "a/b\thttp://a/7.jpg\na\\b\thttp://a/8.jpg\n/abs\thttp://a/9.jpg\n\thttp://a/10.jpg\n"
                     "no tab here\ndog\t\ncat\thttp://a/1.jpg\n.hidden\thttp://a/11.jpg\n"
                     "cat\thttp://a/12.jpg\tthird\n".encode())
    entries, rejected = read_url_list(urls)

    assert [(e.label, e.url, e.index, e.line) for e in entries] == [
        ("cat", "http://a/1.jpg", 1, 3), ("dog", "https://b/1.png", 1, 4), ("cat", "http://a/2.jpg", 2, 6),
        ("cat", "http://a/4.jpg", 4, 8)]  # the refused ftp line keeps number 3, so 4.jpg stays 4.jpg
    assert entries[3].relpath == "cat/4.jpg"
    reasons = {f"{f.label}|{f.url}": f.reason for f in rejected}
    assert len(rejected) == 12
    assert "not an http(s) URL" in reasons["cat|ftp://a/3.jpg"] and f"{urls}:7:" in reasons["cat|ftp://a/3.jpg"]
    for label in ("../up", ".", "a/b", "a\\b", "/abs", ".hidden"):
        assert "not a plain folder name" in next(r for k, r in reasons.items() if k.startswith(label + "|"))
    assert "empty label" in reasons["|http://a/10.jpg"]
    assert "no tab" in reasons["no tab here|"]
    assert "empty url" in reasons["dog|"]
    assert "duplicate of line 3" in reasons["cat|http://a/1.jpg"]
    assert "whitespace (a third column?)" in reasons["cat|http://a/12.jpg\tthird"]

    urls.write_bytes(b"cat\thttp://a/caf\xe9.jpg\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match="not UTF-8 text"):
        read_url_list(urls)


@pytest.mark.parametrize("label", ["", ".", "..", "a/b", "a\\b", "/etc", "C:", ".git"])
def test_check_label_refuses_anything_but_a_plain_folder_name(label):
    with pytest.raises(ValueError, match="label|empty"):
        check_label(label)
    assert check_label("red car") == "red car"


# ---------------------------------------------------------------- downloading

def test_good_jpeg_is_kept_byte_for_byte_and_png_is_reencoded(server, payloads, tmp_path):
    report = download_images(_entries(server, "/good.jpg", "/good.png", "/to-good"), tmp_path / "data", **FAST)

    assert report.summary() == "downloaded 3, already present 0, failed 0 of 3"
    assert (tmp_path / "data/things/1.jpg").read_bytes() == payloads["jpg"]
    assert (tmp_path / "data/things/3.jpg").read_bytes() == payloads["jpg"]  # after a 301
    saved_png = tmp_path / "data/things/2.jpg"
    assert saved_png.read_bytes()[:3] == b"\xff\xd8\xff"
    original = np.asarray(read_image(io.BytesIO(payloads["png"])), np.int16)
    saved = np.asarray(read_image(saved_png), np.int16)
    assert saved.shape == original.shape and np.abs(saved.mean((0, 1)) - original.mean((0, 1))).max() < 2
    assert _leftovers(tmp_path) == []


def test_5xx_is_retried_and_4xx_is_not(server, tmp_path):
    report = download_images(_entries(server, "/flaky.jpg", "/always500", "/missing.jpg"), tmp_path, **FAST)

    assert [e.relpath for e in report.downloaded] == ["things/1.jpg"]
    assert server.hits["/flaky.jpg"] == 2
    assert server.hits["/always500"] == RETRIES + 1
    assert server.hits["/missing.jpg"] == 1
    reasons = [f.reason for f in report.failed]
    assert "HTTP 500" in reasons[0] and "after retries" in reasons[0]
    assert reasons[1] == "HTTP 404 Not Found"


@pytest.mark.parametrize("path, reason, hits", [
    ("/slow.jpg", "Read timed out", RETRIES + 1),   # no headers within the timeout: retried, then failed
    ("/stall.jpg", "body cut off", 1),             # stalls in the body: failed cleanly, not retried
    ("/truncated.jpg", "truncated", 1),
    ("/page.html", "not a usable image", 1),
    ("/loop", "too many redirects", 11),
    ("/big.jpg", "over the 100,000-byte limit", 1),  # refused from its Content-Length
    ("/endless.jpg", "over the 100,000-byte limit (stopped reading)", 1),
])
def test_bad_responses_fail_with_a_reason_and_leave_no_file(server, tmp_path, path, reason, hits):
    started = time.monotonic()
    report = download_images(_entries(server, path), tmp_path, **FAST)

    assert report.downloaded == [] and len(report.failed) == 1
    assert reason in report.failed[0].reason
    assert report.failed[0].url == server.url + path
    assert server.hits[path] == hits
    assert not (tmp_path / "things/1.jpg").exists() and _leftovers(tmp_path) == []
    assert time.monotonic() - started < (RETRIES + 1) * (TIMEOUT + 0.5) + 1
    if path == "/endless.jpg":
        time.sleep(0.2)
        assert server.sent < 50_000_000  # the client hung up long before the server's 100 MB


def test_a_trickling_server_fails_at_the_per_url_deadline(server, tmp_path):
    # ~1,000 bytes at 5 bytes a second: each read is within the timeout, the whole would take minutes.
    start = time.monotonic()
    report = download_images(_entries(server, "/dribble.jpg", "/good.jpg"), tmp_path, **{**FAST, "deadline": 2.0})
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert [e.relpath for e in report.downloaded] == ["things/2.jpg"]
    (failure,) = report.failed
    assert failure.url.endswith("/dribble.jpg") and "over the per-URL deadline" in failure.reason
    assert not (tmp_path / "things/1.jpg").exists() and _leftovers(tmp_path) == []


def test_images_over_the_pixel_limit_are_refused_before_decoding(server, tmp_path):
    report = download_images(_entries(server, "/good.jpg"), tmp_path, **{**FAST, "max_pixels": 64 * 48 - 1})
    (failure,) = report.failed
    assert "64x48 is over the 3,071-pixel limit" in failure.reason


def test_resume_skips_valid_files_and_replaces_corrupt_ones(server, payloads, tmp_path):
    entries = _entries(server, "/good.jpg", "/good.png", "/good2.jpg")
    first = download_images(entries, tmp_path, **FAST)
    assert first.summary() == "downloaded 3, already present 0, failed 0 of 3"

    second = download_images(entries, tmp_path, **FAST)
    assert second.summary() == "downloaded 0, already present 3, failed 0 of 3"
    assert server.hits["/good.jpg"] == 1 and server.hits["/good2.jpg"] == 1

    (tmp_path / "things/3.jpg").write_bytes(payloads["jpg"][:200])  # a half file from some other tool
    third = download_images(entries, tmp_path, **FAST)
    assert [e.relpath for e in third.downloaded] == ["things/3.jpg"] and len(third.present) == 2
    assert (tmp_path / "things/3.jpg").read_bytes() == payloads["jpg"]
    assert server.hits["/good2.jpg"] == 2


def test_stale_temp_files_from_a_killed_write_are_removed(server, tmp_path):
    (tmp_path / "things").mkdir()
    stale = tmp_path / "things/.1.jpg.k9x2ab.tmp"
    stale.write_bytes(b"\xff\xd8\xff half")
    report = download_images(_entries(server, "/good.jpg"), tmp_path, **FAST)
    assert len(report.downloaded) == 1 and not stale.exists() and _leftovers(tmp_path) == []


def test_a_write_that_fails_midway_leaves_no_file_that_looks_done(server, payloads, tmp_path):
    """The script runs with a 8 KB file-size limit (RLIMIT_FSIZE), so writing the 23 KB image fails half-way."""
    urls = _write_urls(tmp_path / "urls.tsv", [f"big\t{server.url}/large-good.jpg"])
    command = [sys.executable, str(REPO / "0_downloadImages.py"), "--urls", str(urls), "--set", f"workDir={tmp_path}",
               "--set", "datasetName=web"]
    target = tmp_path / "data/web/big/1.jpg"
    limited = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000)))

    assert limited.returncode == 1 and f"error: {target}: cannot write:" in limited.stderr
    assert "File too large" in limited.stderr
    assert not target.exists() and _leftovers(tmp_path) == []
    rerun = run_script(*command[1:], timeout=60)
    assert rerun.returncode == 0 and target.read_bytes() == payloads["big_jpg"]


def test_bad_labels_are_refused_and_the_other_lines_proceed(server, tmp_path):
    urls = _write_urls(tmp_path / "urls.tsv", [f"../escape\t{server.url}/good.jpg", f"a/b\t{server.url}/good.jpg",
                                               f"ok\t{server.url}/good.jpg", f"..\t{server.url}/good.png",
                                               f"ok\t{server.url}/good.png"])
    entries, rejected = read_url_list(urls)
    report = download_images(entries, tmp_path / "data", **FAST)

    assert len(rejected) == 3 and report.summary() == "downloaded 2, already present 0, failed 0 of 2"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "data/ok/1.jpg", "data/ok/2.jpg", "urls.tsv"]
    with pytest.raises(ValueError, match="not a plain folder name"):
        download_images([UrlEntry("..", server.url + "/good.jpg", 1)], tmp_path / "data", **FAST)
    with pytest.raises(ValueError, match="several entries would be saved as ok/1.jpg"):
        download_images([UrlEntry("ok", server.url + "/good.jpg", 1), UrlEntry("ok", server.url + "/good.png", 1)],
                        tmp_path / "data", **FAST)


def test_failures_tsv_has_a_header_and_one_row_per_failure(tmp_path):
    path = tmp_path / "results/download_failures.tsv"
    report = DownloadReport(failed=[("http://x/1.jpg", "cat", "HTTP 404 Not Found")])
    save_failures(path, report.failed)
    assert path.read_text() == "url\tlabel\treason\nhttp://x/1.jpg\tcat\tHTTP 404 Not Found\n"
    save_failures(path, [])
    assert path.read_text() == "url\tlabel\treason\n"


# ---------------------------------------------------------------- the script

FAST_SET = ["--set", f"dl_timeoutSec={TIMEOUT}", "--set", "dl_maxRetries=1", "--set", "dl_backoffSec=0.01"]


def _script(urls, work, *extra):
    return run_script("0_downloadImages.py", "--urls", urls, "--set", f"workDir={work}", "--set", "datasetName=web",
                      *FAST_SET, *extra, timeout=120)


def test_script_downloads_reports_and_writes_the_failures_tsv(server, payloads, tmp_path):
    urls = _write_urls(tmp_path / "urls.tsv", ["# label<TAB>url", f"red\t{server.url}/good.jpg",
                                               f"blue\t{server.url}/good.png", f"red\t{server.url}/missing.jpg",
                                               f"../x\t{server.url}/good.jpg"])
    result = _script(urls, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "downloaded 2, already present 0, failed 2 of 4"
    assert (tmp_path / "data/web/red/1.jpg").read_bytes() == payloads["jpg"]
    assert read_image(tmp_path / "data/web/blue/1.jpg").size == (64, 48)
    failures = tmp_path / "results/web/download_failures.tsv"
    rows = [line.split("\t") for line in failures.read_text().splitlines()]
    assert rows[0] == ["url", "label", "reason"]
    assert rows[1][:2] == [f"{server.url}/good.jpg", "../x"] and "not a plain folder name" in rows[1][2]
    assert rows[2] == [f"{server.url}/missing.jpg", "red", "HTTP 404 Not Found"]
    assert str(failures) in result.stdout

    urls = _write_urls(tmp_path / "urls.tsv", [f"red\t{server.url}/good.jpg"])
    again = _script(urls, tmp_path)
    assert again.returncode == 0 and "downloaded 0, already present 1, failed 0 of 1" in again.stdout
    assert failures.read_text() == "url\tlabel\treason\n"  # the stale list is replaced


def test_script_refuses_a_missing_or_unusable_url_file(tmp_path):
    missing = _script(tmp_path / "nope.tsv", tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope.tsv'}: URL list not found"

    urls = _write_urls(tmp_path / "urls.tsv", ["../x\thttp://127.0.0.1:9/a.jpg", "just one column"])
    unusable = _script(urls, tmp_path)
    assert unusable.returncode == 2 and "no usable label<TAB>url line (2 refused)" in unusable.stderr
    assert not (tmp_path / "data").exists()


def test_ctrl_c_with_a_stuck_connection_stops_at_once_and_keeps_finished_files(payloads, tmp_path):
    release = threading.Event()

    def route(handler, hit):
        if handler.path == "/stuck.jpg":  # headers and a few bytes, then nothing until the test ends
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(payloads["jpg"])))
            handler.end_headers()
            handler.wfile.write(payloads["jpg"][:10])
            handler.wfile.flush()
            release.wait(120)
        else:
            _send(handler, 200, payloads["jpg"])

    srv = _serve(route)
    try:
        urls = _write_urls(tmp_path / "urls.tsv", [f"a\t{srv.url}/stuck.jpg", f"b\t{srv.url}/good.jpg"])
        proc = subprocess.Popen([sys.executable, str(REPO / "0_downloadImages.py"), "--urls", str(urls), "--set",
                                 f"workDir={tmp_path}", "--set", "datasetName=web", "--set", "dl_timeoutSec=60",
                                 "--set", "dl_deadlineSec=0"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        finished = tmp_path / "data/web/b/1.jpg"
        wait_until = time.monotonic() + 60
        while not (finished.exists() and srv.hits["/stuck.jpg"]) and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert proc.poll() is None and finished.exists(), "the run should be waiting on the stuck URL"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("Ctrl-C did not stop the run within 10 s")
        assert time.monotonic() - start < 5
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert finished.read_bytes() == payloads["jpg"] and not (tmp_path / "data/web/a/1.jpg").exists()


def test_kill_9_mid_run_then_rerun_gives_the_same_files_as_one_clean_run(tmp_path):
    images = {}
    for i in range(8):
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        path = make_image(tmp_path / "src" / f"{i}.{fmt.lower()}", (30 * i, 200 - 20 * i, 90), pattern="stripes",
                          fmt=fmt)
        images[f"/img{i}"] = path.read_bytes()

    def route(handler, hit):
        if handler.path.endswith(("1", "4", "6")):
            time.sleep(1.0)  # slow enough that the kill lands mid-run
        _send(handler, 200, images[handler.path])

    srv = _serve(route)
    try:
        urls = _write_urls(tmp_path / "urls.tsv", [f"{'ab'[i % 2]}\t{srv.url}/img{i}" for i in range(8)])

        def args(work):
            return ["0_downloadImages.py", "--urls", urls, "--set", f"workDir={tmp_path / work}", "--set",
                    "datasetName=web", "--set", "dl_nrWorkers=2", "--set", "dl_backoffSec=0.01"]

        proc = subprocess.Popen([sys.executable, *map(str, args("killed"))], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        out_dir = tmp_path / "killed/data/web"
        deadline = time.monotonic() + 60
        while not list(out_dir.rglob("*.jpg")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the script ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_before = len(list(out_dir.rglob("*.jpg")))
        assert 1 <= n_before < 8, "the kill did not land mid-run"

        rerun = run_script(*args("killed"), timeout=120)
        clean = run_script(*args("clean"), timeout=120)
    finally:
        srv.shutdown()
        srv.server_close()

    assert rerun.returncode == 0 and clean.returncode == 0, rerun.stderr + clean.stderr
    assert f"downloaded {8 - n_before}, already present {n_before}, failed 0 of 8" in rerun.stdout
    killed = {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    clean_dir = tmp_path / "clean/data/web"
    expected = {p.relative_to(clean_dir).as_posix(): p.read_bytes() for p in clean_dir.rglob("*") if p.is_file()}
    assert sorted(killed) == [f"{'ab'[i % 2]}/{i // 2 + 1}.jpg" for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert killed == expected
    assert all(read_image(io.BytesIO(data)) for data in killed.values())
    assert _leftovers(tmp_path / "killed") == []
