"""The web service: upload an image, get the most similar reference images back (FastAPI).

Everything is loaded once, at start, from a pipeline run's outputs (:func:`.runs.load_run`, then
:meth:`SimilarityService.from_run`): the network that made the stored features (refined checkpoint or pretrained
backbone, checked by ``model_id``), the features, the rankers of 4_trainSvm.py, and the attribute models.
:func:`create_app` wraps a service in a FastAPI app with these endpoints:

``GET /health``
    ``{"status": "ok", "n_references", "model_id", "rankers", "default_ranker", "attributes", "max_upload_bytes",
    "notes"}``.
``POST /query``
    Multipart: ``image`` (the file), ``k`` (1..100, default 5), ``ranker`` (default: the best on validation),
    ``attributes`` (optional, comma-separated attribute names: rank by their combined match probability). Returns
    ``{"ranker", "results": [{"id", "key", "label", "distance", "probability"?}], "timings_ms": {"decode", "wait",
    "network", "search"}}``, nearest first.
``GET /images/{id}``
    The reference image of that id (its row in the features), or a JPEG thumbnail with ``?thumb=1``. Ids are
    opaque: unknown ids, and anything resolving outside the image folder, are 404.
``GET /label-issues``
    The top suspects of A6_findLabelIssues.py's label_issues.csv (:meth:`SimilarityService.label_issues`).
``GET /map``
    A7_embeddingMap.py's embedding_map.json (:meth:`SimilarityService.embedding_map`): ``{"available": true, "path",
    "method", "points": [{id, key, label, x, y, suspect}], "duplicate_pairs"}``, or ``{"available": false,
    "reason"}`` when it is missing or maps other images than the references.
``GET /``
    A small page: drop or pick an image, see the top-k matches with labels and scores; choose k, the ranker, or
    attributes to combine; open "label issues" to see the suspects with their given and suggested labels; open "map"
    to see every reference in the plane (hover: its thumbnail; click: query with it).

Uploads over the size limit are refused with 413 (the declared Content-Length and the bytes actually received are
both checked); the rest of the body is read and dropped first, up to :data:`DISCARD_BYTES`, so that clients which
send everything before reading the reply (urllib, requests) get the 413 too, and the page refuses such a file before
sending it. Bodies that are not a decodable image (text, truncated, decompression bomb) get 415 or 422 naming the
reason.
"""
import asyncio
import html
import io
import logging
import os
import threading
import time
from functools import lru_cache
from pathlib import Path

from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from . import attributes as attribute_models
from . import embedding_map
from ..search import core
from ..data.images import ImageReadError, read_image
from .label_issues import load_label_issues as label_issue_rows
from .service_page import PAGE
from ..data.splits import label_of

__all__ = ["SimilarityService", "create_app", "server_config", "parse_count", "MAX_K", "FORM_OVERHEAD_BYTES",
           "DISCARD_BYTES"]

logger = logging.getLogger(__name__)

MAX_K = 100
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers and the small fields around the image
LABEL_ISSUES_SHOWN = 60  # suspects listed by /label-issues and the page
DISCARD_BYTES = 256 * 2**20  # an oversize body is read and dropped up to this size, so that its 413 reaches the client


def parse_count(text, name, low, high):
    """``text`` as an int in ``low..high``, or ValueError saying so (in plain words, whatever the text's length).

    Only ASCII digits are read, and no more of them than ``high`` has: Python's int() refuses very long numbers with
    a message about its own limits, and reads non-ASCII digits.
    """
    text = str(text)
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))) or not low <= int(text) <= high:
        shown = text if len(text) <= 20 else f"{text[:20]}... ({len(text)} characters)"
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {shown!r}")
    return int(text)


class SimilarityService:
    """One loaded pipeline run, answering image queries; thread-safe.

    Parameters
    ----------
    embedder : embedder.Embedder
        The network; its ``model_id`` must be the features'.
    gallery : core.Gallery
        The references (with a ``colour_source`` for the "cosine+colour" ranker).
    ranker_map : dict of str to ranker
        ``rankers.build_rankers(...)``.
    image_dir : str or Path
        The folder the keys are relative to (``P.imgDir``).
    default_ranker : str
        A key of ``ranker_map``.
    attribute_map : dict of str to attributes.AttributeModel, optional
        Attributes a query may combine by name.
    max_upload_bytes : int
        Largest accepted image upload, in bytes.
    max_image_pixels : int
        Largest accepted upload in pixels (width x height), checked from its header before decoding.
    thumb_px : int
        Longest side of thumbnails, in pixels.
    notes : list of str, optional
        What is missing (reported by ``/health``).
    label_issues_path : str or Path, optional
        A label_issues.csv of A6_findLabelIssues.py, read by :meth:`label_issues` when it exists.
    embedding_map_path : str or Path, optional
        An embedding_map.json of A7_embeddingMap.py, read by :meth:`embedding_map` when it exists.
    """

    def __init__(self, embedder, gallery, ranker_map, image_dir, default_ranker="cosine", attribute_map=None,
                 max_upload_bytes=10_000_000, thumb_px=160, notes=(), label_issues_path=None,
                 max_image_pixels=40_000_000, embedding_map_path=None):
        self.embedder = embedder
        if embedder.model_id != gallery.model_id:
            raise ValueError(f"the network is {embedder.model_id} but the features come from {gallery.model_id}")
        core.resolve_ranker(default_ranker, ranker_map)
        self.gallery = gallery
        self.keys = gallery.keys
        self.model_id = gallery.model_id
        self.rankers = dict(ranker_map)
        self.default_ranker = default_ranker
        self.attributes = dict(attribute_map or {})
        for name, attribute in self.attributes.items():
            if attribute.model_id not in (None, self.model_id):
                raise ValueError(f"attribute {name!r} was trained on {attribute.model_id}, not {self.model_id}")
        self.image_dir = Path(image_dir).resolve()
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.thumb_px = int(thumb_px)
        self.notes = list(notes)
        self.label_issues_path = Path(label_issues_path) if label_issues_path else None
        self.embedding_map_path = Path(embedding_map_path) if embedding_map_path else None
        self._map_cache = (None, None)  # (the file's identity, its /map document)
        # As many forward passes at once as the network runs side by side (an engine's streams; PyTorch: one, as
        # parallel ones only fight over the cores).
        self._net_slots = threading.BoundedSemaphore(getattr(embedder.engine, "streams", 1))
        self.thumbnail = lru_cache(maxsize=4096)(self._thumbnail)

    @classmethod
    def from_run(cls, run, image_dir, max_upload_bytes=10_000_000, thumb_px=160, label_issues_path=None,
                 max_image_pixels=40_000_000, embedding_map_path=None):
        """The service of a run loaded by :func:`.runs.load_run` (with its network)."""
        for note in run.notes:
            logger.warning(note)
        gallery = core.run_gallery(run.features, run.candidates[2], image_dir, run.load_network)
        return cls(run.embedder, gallery, run.rankers, image_dir, run.default_ranker, run.attributes,
                   max_upload_bytes, thumb_px, run.notes, label_issues_path, max_image_pixels, embedding_map_path)

    def health(self):
        """The ``/health`` document: a dict of plain JSON values."""
        return {"status": "ok", "n_references": len(self.keys), "model_id": self.model_id,
                "rankers": list(self.rankers), "default_ranker": self.default_ranker,
                "probability_rankers": [n for n, r in self.rankers.items() if hasattr(r, "probabilities")],
                "attributes": list(self.attributes), "max_upload_bytes": self.max_upload_bytes, "notes": self.notes}

    def query(self, data, k=5, ranker=None, attribute_names=()):
        """The ``k`` references nearest to an encoded image.

        Parameters
        ----------
        data : bytes
            The image file's bytes (any format ``images.read_image`` decodes).
        k : int
            Matches returned, 1..``MAX_K`` (at most the number of references).
        ranker : str, optional
            A ranker name; default ``default_ranker``. Ignored when ``attribute_names`` are given.
        attribute_names : sequence of str
            Attributes to combine (``attributes.combine``, equal weights): matches are ranked by 1 - combined
            P(match).

        Returns
        -------
        dict
            ``ranker`` (str), ``results`` (list of ``{"id": int, "key", "label", "distance": float,
            "probability": float}``, the probability only for calibrated rankers and attributes), ``timings_ms``
            (float milliseconds: ``decode`` the upload and resize it, ``wait`` for the network while it serves other
            queries, run the ``network``, ``search`` the references).

        Raises
        ------
        ValueError
            For a bad ``k``, ranker or attribute name.
        ImageReadError
            When ``data`` is not a usable image.
        """
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
        unknown = [name for name in attribute_names if name not in self.attributes]
        if unknown:
            raise ValueError(f"unknown attribute(s) {unknown}: configured are {list(self.attributes)}")
        if attribute_names:
            scorer = attribute_models.combine([self.attributes[name] for name in attribute_names])
            name = "attributes:" + "+".join(attribute_names)
        else:
            name = ranker or self.default_ranker
            scorer = core.resolve_ranker(name, self.rankers)
        start = time.perf_counter()
        image = read_image(io.BytesIO(data), max_pixels=self.max_image_pixels)
        decoded = time.perf_counter()
        with self._net_slots:
            locked = time.perf_counter()
            vector, colours = core.embed_query(self.embedder, image)
            embedded = time.perf_counter()
        with_probability = hasattr(scorer, "probabilities")
        results = [{"id": row, "key": key, "label": label_of(key), "distance": distance,
                    **({"probability": 1.0 - distance} if with_probability else {})}
                   for _, _, row, key, distance in core.search(self.gallery, scorer, vector, k, colours).rows()]
        searched = time.perf_counter()
        timings = {"decode": decoded - start, "wait": locked - decoded, "network": embedded - locked,
                   "search": searched - embedded}
        return {"ranker": name, "results": results, "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}}

    def label_issues(self, n=LABEL_ISSUES_SHOWN):
        """The ``/label-issues`` document: the top ``n`` suspects of label_issues.csv, with their image ids.

        ``{"available": bool, "path": str or None, "suspects": [{rank, key, id, split, given_label,
        suggested_label, p_given_label, flagged}, ...]}``; ``id`` is None for an image that is not a reference.
        """
        path = self.label_issues_path
        if path is None or not path.is_file():
            return {"available": False, "path": str(path) if path else None, "suspects": []}
        row_of = {key: row for row, key in enumerate(self.keys)}
        fields = ("rank", "key", "split", "given_label", "suggested_label", "p_given_label", "flagged")
        suspects = [{**{f: row[f] for f in fields}, "id": row_of.get(row["key"])}
                    for row in label_issue_rows(path, n)]
        return {"available": True, "path": str(path), "suspects": suspects}

    def embedding_map(self):
        """The ``/map`` document: the embedding map when its keys are the references', in order (ids are rows).

        Read once per version of the file (A7 replaces it by renaming, so its inode, size or mtime change) and
        cached; ``{"available": False, "reason": str}`` when it is missing, unreadable or maps other images.
        """
        path = self.embedding_map_path
        try:
            stat = path.stat() if path else None
        except OSError:  # missing, or removed a moment ago
            stat = None
        if stat is None:
            where = f" at {path}" if path else ""
            return {"available": False, "reason": f"no embedding map{where}: run A7_embeddingMap.py"}
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._map_cache[0] != identity:
            self._map_cache = (identity, self._read_map(path))
        return self._map_cache[1]

    def _read_map(self, path):
        try:
            document = embedding_map.load_map(path)
        except (OSError, ValueError) as err:
            return {"available": False, "reason": str(err)}
        points = document.get("points")
        points = points if isinstance(points, list) else []
        keys = [point.get("key") if isinstance(point, dict) else None for point in points]
        if keys != list(self.keys):
            differ = next((f"row {i} is {a!r}, not {b!r}" for i, (a, b) in enumerate(zip(keys, self.keys)) if a != b),
                          f"{len(keys)} points for {len(self.keys)} references")
            return {"available": False, "reason": f"{path} maps other images than the service's references "
                                                  f"({differ}): run A7_embeddingMap.py again"}
        return {"available": True, "path": str(path), "method": document.get("method", ""),
                "points": points, "duplicate_pairs": document.get("duplicate_pairs", [])}

    def image_path(self, image_id):
        """The file of reference ``image_id`` (a row number as text), or KeyError when there is none."""
        try:
            row = parse_count(image_id, "id", 0, len(self.keys) - 1)
        except ValueError:
            raise KeyError(image_id) from None
        path = (self.image_dir / self.keys[row]).resolve()
        if not path.is_relative_to(self.image_dir) or not path.is_file():
            raise KeyError(image_id)
        return path

    def _thumbnail(self, image_id):
        """JPEG bytes of reference ``image_id``, longest side ``thumb_px``; KeyError or ImageReadError."""
        image = read_image(self.image_path(image_id))
        image.thumbnail((self.thumb_px, self.thumb_px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


async def _discard_body(receive, received=0, bound=None):
    """Read and drop the rest of a request body, up to ``bound`` bytes in all (default :data:`DISCARD_BYTES`).

    urllib and requests send the whole body before they read the reply: a 413 sent while they are still sending
    reaches them as "Connection reset by peer". Past ``bound`` the connection is closed anyway.
    """
    bound = DISCARD_BYTES if bound is None else bound
    more = True
    while more and received <= bound:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)


def _limited(receive, limit, image_limit, timeout_s):
    """Wrap an ASGI ``receive``: a body longer than ``limit`` bytes stops with 413 (naming ``image_limit``), one not
    complete within ``timeout_s`` seconds of the first read (None: no bound) with 408."""
    received = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def limited_receive():
        nonlocal received
        try:
            message = await asyncio.wait_for(receive(), deadline and max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise HTTPException(408, f"the upload was not complete within {timeout_s:g} s") from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await _discard_body(receive, received)
                raise HTTPException(413, f"upload over the {image_limit:,}-byte limit")
        return message

    return limited_receive


def create_app(service, upload_timeout_s=60.0, max_decodes=None):
    """The FastAPI app serving one :class:`SimilarityService`.

    Parameters
    ----------
    service : SimilarityService
    upload_timeout_s : float or None
        A query's upload must arrive within this many seconds (else 408), so that slow bodies hold no worker;
        None: no bound.
    max_decodes : int, optional
        Queries decoded and searched at once; each holds at most one decoded image (bounded by the reader's decode
        budget). None: one per core.

    Returns
    -------
    fastapi.FastAPI
        With the service as ``app.state.service``.
    """
    app = FastAPI(title="Image similarity", version="1")
    app.state.service = service
    body_limit = service.max_upload_bytes + FORM_OVERHEAD_BYTES
    # Queries decode and search in at most one thread per core: more would only hold more decoded images at once.
    workers = {"limiter": None, "n": max_decodes or len(os.sched_getaffinity(0))}

    def limiter():
        if workers["limiter"] is None:  # created in the event loop, on first use
            workers["limiter"] = CapacityLimiter(workers["n"])
        return workers["limiter"]

    @app.get("/health")
    def health():
        return service.health()

    @app.post("/query")
    async def query(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdecimal() and int(declared) > body_limit:
            if request.headers.get("expect", "").lower() != "100-continue":  # curl waits for the reply instead
                await _discard_body(request.receive)
            raise HTTPException(413, f"upload of {int(declared):,} bytes is over the "
                                     f"{service.max_upload_bytes:,}-byte limit")
        limited = Request(request.scope, _limited(request.receive, body_limit, service.max_upload_bytes,
                                                  upload_timeout_s))
        try:
            async with limited.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise HTTPException(400, "no image: send the file as the multipart field 'image'")
                data = await upload.read(service.max_upload_bytes + 1)
                filename = upload.filename or "upload"
                fields = {name: form.get(name) for name in ("k", "ranker", "attributes")}
        except ClientDisconnect:  # nobody is left to answer: one line, not an ASGI traceback
            logger.info("client %s went away during its upload", request.client.host if request.client else "?")
            return Response(status_code=400)
        if len(data) > service.max_upload_bytes:
            raise HTTPException(413, f"{filename} is over the {service.max_upload_bytes:,}-byte limit")
        names = [n.strip() for n in (fields["attributes"] or "").split(",") if n.strip()]
        try:
            k = parse_count(fields["k"] if fields["k"] not in (None, "") else "5", "k", 1, MAX_K)
            return await to_thread.run_sync(service.query, data, k, fields["ranker"] or None, names,
                                            limiter=limiter())
        except ImageReadError as err:
            status = 415 if err.reason.startswith(("not an image", "format ")) else 422
            raise HTTPException(status, f"{filename}: {err.reason}") from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    @app.get("/images/{image_id}")
    async def image(image_id: str, thumb: bool = Query(False)):
        try:
            if thumb:
                thumbnail = await to_thread.run_sync(service.thumbnail, image_id, limiter=limiter())
                return Response(thumbnail, media_type="image/jpeg",
                                headers={"Cache-Control": "max-age=3600"})
            return FileResponse(service.image_path(image_id))
        except KeyError:
            raise HTTPException(404, f"no image with id {image_id!r}") from None
        except ImageReadError as err:
            raise HTTPException(500, f"reference image {image_id} is unreadable: {err.reason}") from None

    @app.get("/label-issues")
    def label_issues():
        return service.label_issues()

    @app.get("/map")
    def embedding_map_view():
        return service.embedding_map()

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("{{title}}", html.escape(f"Image similarity: {len(service.keys)} references"))

    return app


def server_config(app, host="127.0.0.1", port=8000, request_timeout_s=60.0, max_connections=200, log_level="info"):
    """A uvicorn configuration whose connections cannot be held open by slow or silent clients.

    Parameters
    ----------
    app : fastapi.FastAPI
    host : str
    port : int
    request_timeout_s : float or None
        A connection must send a request's headers within this many seconds of opening (or of its previous
        response), else it is closed; bodies have the same bound in :func:`create_app`. None: no bound.
    max_connections : int or None
        Connections and requests in flight at once; past it new requests get 503 at once. None: no bound.
    log_level : str

    Returns
    -------
    uvicorn.Config
    """
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose next request's headers are not in by the deadline."""

        def _arm(self):
            waiting_for = self.cycle  # a new request replaces the cycle; the same one at the deadline: none came
            self.loop.call_later(request_timeout_s, self._expire, waiting_for)

        def _expire(self, waiting_for):
            idle = waiting_for is None or waiting_for.response_complete  # never cut a request being answered
            if self.cycle is waiting_for and idle and not self.transport.is_closing():
                logger.info("closed a connection from %s: no request within %g s",
                            self.client[0] if self.client else "?", request_timeout_s)
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            self._arm()  # before a pipelined request, if any, starts in there
            super().on_response_complete()

    return uvicorn.Config(app, host=host, port=port, http=HeaderDeadlineProtocol if request_timeout_s else "h11",
                          limit_concurrency=max_connections,
                          timeout_keep_alive=5, log_level=log_level)
