"""The web service (image_similarity.apps.service, A4_webService.py) on a real uvicorn over a small real pipeline."""
import io
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
import requests
import uvicorn
from PIL import Image

import helpers
from conftest import REPO, make_image, make_labelled_images, run_script
from image_similarity.apps.service import create_app
from image_similarity.pipeline.layout import RunLayout

LIMIT = 200_000  # svc_maxUploadBytes in these tests


def pipeline_args(work):
    return ["--set", f"workDir={work}", "--set", "datasetName=tiny", "--set", "rf_maxEpochs=0",
            "--set", "dedup_enabled=False", "--set", "ratioValFromTrain=0.3", "--set", "run_nrWorkers=0",
            "--set", "svm_CValCandidates=[1.0]", "--set", "svm_classProbCValCandidates=[10.0]",
            *(arg for split in ("train", "val", "test") for arg in ("--set", f"{split}_maxNegImgsPerQueryImg=20"))]


def free_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A workDir with 3 labels x 12 generated images through steps 1, 3 (pretrained Lite0) and 4."""
    work = tmp_path_factory.mktemp("service")
    make_labelled_images(work / "data" / "tiny", 12)
    args = pipeline_args(work)
    for step in ("1_prepareData.py", "3_featurizeImages.py", "4_trainSvm.py"):
        result = run_script(step, *args)
        assert result.returncode == 0, f"{step}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return work, args


def parameters(work, *extra):
    overrides = [a for a in pipeline_args(work) if a != "--set"]
    return helpers.load_parameters([*overrides, f"svc_maxUploadBytes={LIMIT}", *extra])


@pytest.fixture(scope="module")
def server(pipeline):
    """A real uvicorn in a thread serving create_app(P), with the classprob payload as a second attribute."""
    work, _ = pipeline
    P = parameters(work, f"attributeModels={{'again': '{work / 'proc' / 'tiny' / 'classprob.skops'}'}}")
    sock = free_socket()
    config = uvicorn.Config(create_app(helpers.load_service(P)), log_level="warning", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client, P
    uv.should_exit = True
    thread.join(10)
    sock.close()


def encoded(path_or_image, fmt="JPEG"):
    image = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def query(client, data, name="query.jpg", **fields):
    return client.post("/query", files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in fields.items()})


def red_query(tmp_path):
    return make_image(tmp_path / "q.png", (205, 25, 35), pattern="stripes").read_bytes()


def test_health(server):
    client, P = server
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["n_references"] == 36
    assert health["model_id"] == "pretrained:efficientnet_lite0"
    assert health["rankers"] == ["random", "L1", "L2", "cosine", "cosine+colour", "weightedl2", "weightedl2prob",
                                 "classprob_L2", "classprob_cosine", "classprob_same", "hybrid"]
    assert health["default_ranker"] == "hybrid"  # step 4 made a classifier: labels first, looks within
    assert health["attributes"] == ["tiny", "again"]
    assert health["max_upload_bytes"] == LIMIT and health["notes"] == []


def test_query_returns_k_sorted_matches_that_are_served(server, tmp_path):
    client, _ = server
    response = query(client, red_query(tmp_path), k=7, ranker="L2")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ranker"] == "L2"
    results = body["results"]
    assert len(results) == 7
    distances = [r["distance"] for r in results]
    assert distances == sorted(distances)
    assert [r["label"] for r in results[:5]] == ["red"] * 5  # red stripes, like the query
    assert all("probability" not in r for r in results)
    assert set(body["timings_ms"]) == {"decode", "wait", "network", "search"}
    assert all(v >= 0 for v in body["timings_ms"].values())
    for match in results[:3]:
        full = client.get(f"/images/{match['id']}")
        assert full.status_code == 200
        assert full.content == (server[1].imgDir / match["key"]).read_bytes()
        thumb = client.get(f"/images/{match['id']}", params={"thumb": 1})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(thumb.content)) as img:
            assert img.format == "JPEG" and max(img.size) <= 160


def test_default_k_and_ranker(server, tmp_path):
    client, _ = server
    body = query(client, red_query(tmp_path)).json()
    assert body["ranker"] == "hybrid" and len(body["results"]) == 5
    distances = [r["distance"] for r in body["results"]]
    assert distances == sorted(distances) and len(set(distances)) == 5  # looks order the label: no ties


def test_weightedl2prob_gives_probabilities(server, tmp_path):
    client, _ = server
    results = query(client, red_query(tmp_path), k=10, ranker="weightedl2prob").json()["results"]
    probabilities = np.array([r["probability"] for r in results])
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert (np.diff(probabilities) <= 1e-12).all()  # nearest first = most probable first
    assert np.allclose(probabilities, 1 - np.array([r["distance"] for r in results]))


def test_attributes_combined(server, tmp_path):
    client, _ = server
    single = query(client, red_query(tmp_path), k=36, attributes="tiny").json()
    both = query(client, red_query(tmp_path), k=36, attributes="tiny, again").json()
    assert single["ranker"] == "attributes:tiny" and both["ranker"] == "attributes:tiny+again"
    p_single = {r["id"]: r["probability"] for r in single["results"]}
    p_both = {r["id"]: r["probability"] for r in both["results"]}
    assert len(p_single) == len(p_both) == 36
    assert p_single != p_both  # the class-probability attribute changes the combined probability
    assert [r["label"] for r in both["results"][:5]] == ["red"] * 5
    unknown = query(client, red_query(tmp_path), attributes="tiny,colour")
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]


@pytest.mark.parametrize("fields, word", [({"k": 0}, "k must be"), ({"k": 101}, "k must be"), ({"k": "x"}, "k must"),
                                          ({"ranker": "nope"}, "unknown ranker")])
def test_bad_fields_are_422(server, tmp_path, fields, word):
    client, _ = server
    response = query(client, red_query(tmp_path), **fields)
    assert response.status_code == 422 and word in response.json()["detail"]


def test_missing_image_field_is_400(server):
    client, _ = server
    response = client.post("/query", data={"k": "3"}, files={"other": ("a.txt", b"x")})
    assert response.status_code == 400 and "'image'" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/36",
                                  "/images/-1", "/images/red%2Fred_0.jpg", "/images/1e3", "/images/%20%201"])
def test_traversal_and_unknown_ids_are_404(server, path):
    client, _ = server
    response = client.get(path)
    assert response.status_code == 404
    response = client.get(path, params={"thumb": 1})
    assert response.status_code == 404


def bomb_png():
    """A 10000 x 10000 1-bit PNG: 100 Mpixels (over read_image's limit) in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_are_refused_and_the_server_keeps_serving(server, tmp_path):
    client, P = server
    good = encoded(P.imgDir / "green" / "green_0.jpg")
    cases = {"text": (b"this is text, not pixels\n" * 20, 415, "not an image"),
             "empty": (b"", 415, "not an image"),
             "truncated": (good[:len(good) // 2], 422, "truncated"),
             "bomb": (bomb_png(), 422, "decompression bomb")}
    assert len(cases["bomb"][0]) < 100_000
    for name, (data, status, reason) in cases.items():
        response = query(client, data, name=f"{name}.jpg")
        assert response.status_code == status, (name, response.text)
        assert reason in response.json()["detail"] and f"{name}.jpg" in response.json()["detail"]
    # Over the limit: declared by Content-Length (far over), and just over (within the form's overhead allowance).
    noise = np.random.default_rng(0).integers(0, 256, 3 * LIMIT, dtype=np.uint8).tobytes()
    for size in (3 * LIMIT, LIMIT + 1):
        response = query(client, noise[:size])
        assert response.status_code == 413, (size, response.text)
        assert f"{LIMIT:,}-byte limit" in response.json()["detail"]
    after = query(client, good, k=3)
    assert after.status_code == 200 and [r["label"] for r in after.json()["results"]] == ["green"] * 3


def test_chunked_upload_without_length_is_counted(server):
    """No Content-Length: the bytes received are counted and the upload stops with 413."""
    client, P = server
    boundary = "svc-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/query", content=body(), headers={"Content-Type": f"multipart/form-data; boundary="
                                                                              f"{boundary}"})
    assert response.status_code == 413
    assert query(client, encoded(P.imgDir / "blue" / "blue_1.jpg"), k=1).status_code == 200


def multipart(data, boundary="svc-test-boundary"):
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


BIG = 60_000_000  # far over the socket buffers: a reply sent while the client is still sending would reset it


def test_oversize_upload_reaches_python_clients_as_413(server):
    """urllib and requests send the whole body before reading the reply: they get the 413, not a reset."""
    client, P = server
    body, content_type = multipart(b"\0" * BIG)
    request = urllib.request.Request(f"{client.base_url}/query", data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 413 and f"{LIMIT:,}-byte limit" in refused.value.read().decode()

    response = requests.post(f"{client.base_url}/query", data=body, headers={"Content-Type": content_type},
                             timeout=120)
    assert response.status_code == 413 and f"upload of {len(body):,} bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is found while reading
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]
    response = requests.post(f"{client.base_url}/query", data=chunks(), headers={"Content-Type": content_type},
                             timeout=120)
    assert response.status_code == 413 and f"{LIMIT:,}-byte limit" in response.json()["detail"]
    assert query(client, encoded(P.imgDir / "red" / "red_2.jpg"), k=1).status_code == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_oversize_upload_reaches_curl_as_413(server, tmp_path):
    client, _ = server
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * BIG)
    result = subprocess.run(["curl", "-sS", "-F", f"image=@{big}", f"{client.base_url}/query"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "413" not in result.stderr and f"{LIMIT:,}-byte limit" in result.stdout


def test_page_is_served(server):
    client, _ = server
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('type="file"', 'id="k"', 'id="ranker"', 'id="results"', "/query", "/images/",
                   "36 references", "file.size > maxUploadBytes"):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside


def test_missing_payloads_leave_the_fixed_rankers(pipeline, tmp_path):
    work, _ = pipeline
    P = parameters(work)
    bare = RunLayout(tmp_path / "proc", tmp_path / "results")  # the run's features, without step 4's payloads
    bare.proc_dir.mkdir(parents=True)
    for name in ("features.npy", "features.json"):
        shutil.copy(P.layout.proc_dir / name, bare.proc_dir / name)
    P.layout = bare
    service = helpers.load_service(P)
    assert list(service.rankers) == ["random", "L1", "L2", "cosine", "cosine+colour"]
    assert service.attributes == {} and len(service.notes) == 2 and "4_trainSvm.py" in service.notes[0]


class ServedScript:
    """A4_webService.py in a subprocess on a free port, until the block ends; ``output`` holds what it printed."""

    def __init__(self, *args):
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(REPO / "A4_webService.py"), *args, "--port",
                                         str(self.port)], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.output = ""

    def __enter__(self):
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            assert time.monotonic() < deadline, "A4_webService.py did not answer /health"
            try:
                self.health = httpx.get(f"{self.url}/health", timeout=2).json()
                return self
            except httpx.TransportError:
                time.sleep(0.3)

    def __exit__(self, *exc):
        self.process.terminate()
        self.output, _ = self.process.communicate(timeout=30)


def test_script_serves_and_refuses_missing_features(pipeline, tmp_path):
    work, args = pipeline
    missing = run_script("A4_webService.py", "--set", f"workDir={tmp_path}", "--set", "datasetName=tiny")
    assert missing.returncode == 2 and "3_featurizeImages.py" in missing.stderr
    # One way to name the dataset, as in every other script.
    assert run_script("A4_webService.py", "--dataset", "tiny").returncode == 2
    with ServedScript(*args) as served:
        assert served.health["n_references"] == 36
    assert "Serving 36 references of tiny" in served.output and f"Open {served.url}/" in served.output


def test_huge_numbers_get_plain_answers(server, tmp_path):
    client, _ = server
    assert client.get("/images/" + "1" * 4301).status_code == 404
    assert client.get("/images/" + "1" * 4301, params={"thumb": 1}).status_code == 404
    response = query(client, red_query(tmp_path), k="9" * 5000)
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail.startswith("k must be an integer in 1..100, got '99999")
    assert "(5000 characters)" in detail and "4300" not in detail and len(detail) < 120


def _raw(url, data):
    """A socket to the server of ``url`` that has sent ``data``."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(data)
    return sock


def _reply_or_close(sock):
    """The first bytes the server sends back, b'' when it closes the connection; and the seconds it took."""
    start = time.monotonic()
    try:
        data = sock.recv(200)
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - start


def test_script_bounds_slow_and_vanishing_clients(pipeline):
    """Slow headers are cut, a slow body gets 408, a client gone mid-upload is one log line (no traceback)."""
    _, args = pipeline
    with ServedScript(*args, "--set", "svc_requestTimeoutSec=2") as served:
        slow_headers = _raw(served.url, b"GET /health HTTP/1.1\r\nHost: x\r\n")
        body, content_type = multipart(b"\xff\xd8" + bytes(50_000))
        head = (f"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        slow_body = _raw(served.url, head + body[:1000])
        for _ in range(3):
            _raw(served.url, head + body[:20_000]).close()
        reply, seconds = _reply_or_close(slow_headers)
        assert reply == b"" and seconds < 8
        reply, seconds = _reply_or_close(slow_body)
        assert reply.startswith(b"HTTP/1.1 408") and seconds < 8
        assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200  # still serving
    assert "Traceback" not in served.output and "Exception in ASGI application" not in served.output
    assert served.output.count("went away during its upload") == 3, served.output[-3000:]


def test_label_issues_view_reads_the_csv_when_present(server):
    client, P = server
    assert not P.labelIssuesPath.exists()
    assert client.get("/label-issues").json() == {"available": False, "path": str(P.labelIssuesPath),
                                                   "suspects": []}
    write_label_issues(P.labelIssuesPath)
    try:
        body = client.get("/label-issues").json()
        assert body["available"] and [s["key"] for s in body["suspects"]] == ["red/red_3.jpg", "gone/x.jpg"]
        first = body["suspects"][0]
        assert (first["given_label"], first["suggested_label"], first["p_given_label"]) == ("red", "blue", "0.0312")
        assert first["id"] is not None and body["suspects"][1]["id"] is None
        assert client.get(f"/images/{first['id']}?thumb=1").status_code == 200
        assert 'id="issues-view"' in client.get("/").text
    finally:
        P.labelIssuesPath.unlink()


def write_label_issues(path):
    """A label_issues.csv as A6_findLabelIssues.py writes it: one real reference and one key that is not one."""
    from image_similarity.data.fileio import save_csv
    from image_similarity.apps.label_issues import LABEL_ISSUE_COLUMNS

    rows = [dict(rank=1, key="red/red_3.jpg", split="train", given_label="red", suggested_label="blue",
                 p_given_label="0.0312", p_suggested_label="0.9", label_quality="0.0312", flagged="yes",
                 duplicate_with_other_label=""),
            dict(rank=2, key="gone/x.jpg", split="test", given_label="gone", suggested_label="red",
                 p_given_label="0.2", p_suggested_label="0.7", label_quality="0.2", flagged="no",
                 duplicate_with_other_label="")]
    save_csv(path, LABEL_ISSUE_COLUMNS, [[row[c] for c in LABEL_ISSUE_COLUMNS] for row in rows])


def write_map(P, reorder=False):
    """The embedding map of the served features as A7_embeddingMap.py writes it (t-SNE), with one label-issue
    suspect and one near-duplicate pair; ``reorder``: its rows in another order than the references'."""
    from image_similarity.apps import embedding_map
    from image_similarity.data.features import load_features

    features = load_features(P.featuresPath)
    keys, matrix = list(features.keys), np.asarray(features.matrix)
    if reorder:
        keys, matrix = keys[::-1], matrix[::-1]
    emap = embedding_map.build_map(keys, matrix, "tsne", flagged=[keys[3]], duplicate_groups=[[keys[0], keys[1]]])
    embedding_map.save_map(P.embeddingMapPath, emap)
    return emap


def test_map_view_serves_the_map_of_the_references_only(server):
    client, P = server
    assert not P.embeddingMapPath.exists()
    missing = client.get("/map").json()
    assert missing["available"] is False and "run A7_embeddingMap.py" in missing["reason"]
    try:
        emap = write_map(P)
        body = client.get("/map").json()
        assert body["available"] and body["method"] == "tsne" and body["path"] == str(P.embeddingMapPath)
        keys = [client.get(f"/images/{p['id']}").content == (P.imgDir / p["key"]).read_bytes()
                for p in body["points"]]
        assert len(keys) == 36 and all(keys)  # every point's id serves that point's image
        assert [p["key"] for p in body["points"]] == emap.keys
        assert [p["id"] for p in body["points"] if p["suspect"]] == [3] and body["duplicate_pairs"] == [[0, 1]]
        assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in body["points"])
        write_map(P, reorder=True)  # ids would point at other images: refused, saying why
        refused = client.get("/map").json()
        assert refused["available"] is False
        assert "maps other images than the service's references (row 0 is" in refused["reason"]
        assert "run A7_embeddingMap.py again" in refused["reason"]
        P.embeddingMapPath.write_text('{"format": "something else"}')
        assert "not an embedding map" in client.get("/map").json()["reason"]
        P.embeddingMapPath.write_text('{"format": "image_similarity.embedding_map/1", "points": [7]}')
        assert "(row 0 is None, not " in client.get("/map").json()["reason"]  # not a point: refused, not a 500
        assert 'id="map-view"' in client.get("/").text
    finally:
        P.embeddingMapPath.unlink(missing_ok=True)
