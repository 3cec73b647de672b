"""Load test of the web service (A4_webService.py) on the bundled sample's pipeline outputs, over loopback only.

For each inference backend of --backends (run_backend; default: PyTorch, then "auto", i.e. before and after the
inference engines), one after the other in this one run:
starts the service as a subprocess on a free port of 127.0.0.1, warms it up, then runs --clients concurrent clients
(one asyncio task each, one connection each) sending --queries POST /query requests one after another, each with
one of the sample photos. Reports the latency percentiles (p50, p95, p99), throughput, errors, the server-side
timings it reports, and the server's resident memory (RSS) after start, after a warm-up at the same concurrency
(2 queries per client) and after the load.

Needs proc/fridgeObjects/features.npy (and ideally the rankers): `.venv/bin/python run_pipeline.py` makes them.
Prints the numbers and writes bench/results/service_load.json (one entry per backend, and the p50 ratio).
    python bench/service_load.py [--clients 50] [--queries 20] [--k 5] [--ranker NAME] [--backends torch,auto]
"""
import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from image_similarity.models import engines
from image_similarity.data import fileio
from image_similarity.data.images import list_images

REPO = Path(__file__).resolve().parents[1]
DATASET = "fridgeObjects"
FEATURES = REPO / "proc" / DATASET / "features.npy"
RESULTS = REPO / "bench" / "results" / "service_load.json"


def rss_mb(pid):
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(port, log, backend):
    """The service as a subprocess; returns it once /health answers (or raises with its log)."""
    process = subprocess.Popen([sys.executable, str(REPO / "A4_webService.py"), "--port", str(port),
                                "--set", f"datasetName={DATASET}", "--set", f"run_backend={backend}"], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}: see {log.name}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the service did not answer /health within 300 s: see {log.name}")


async def client(http, uploads, n_queries, offset, fields, latencies, errors, server_ms):
    """One client: ``n_queries`` queries one after another, cycling through ``uploads``."""
    for i in range(n_queries):
        name, data = uploads[(offset + i) % len(uploads)]
        start = time.perf_counter()
        try:
            response = await http.post("/query", files={"image": (name, data)}, data=fields)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            else:
                server_ms.append(response.json()["timings_ms"])
        except httpx.HTTPError as err:
            errors.append(f"{type(err).__name__}: {err}")


async def load(url, uploads, n_clients, n_queries, fields):
    latencies, errors, server_ms = [], [], []
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, uploads, n_queries, c * n_queries, fields, latencies, errors, server_ms)
                               for c in range(n_clients)))
        wall = time.perf_counter() - start
    return np.asarray(latencies), errors, server_ms, wall


def measure(backend, uploads, fields, args):
    """Start the service with ``backend``, warm it up, load it; the result dict (latencies in seconds)."""
    load_before = os.getloadavg()[0]  # the CPU is shared: other work slows the service down
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", prefix=f"service_load_{backend}_", suffix=".log", delete=False) as log:
        process = start_service(port, log, backend)
        try:
            rss = {"started": rss_mb(process.pid)}
            health = httpx.get(f"{url}/health").json()
            # The warm-up runs at full concurrency, so the load proper starts from the steady state.
            _, warm_errors, _, _ = asyncio.run(load(url, uploads, args.clients, 2, fields))
            if warm_errors:
                raise RuntimeError(f"warm-up failed: {warm_errors[0]}")
            rss["after_warmup"] = rss_mb(process.pid)
            print(f"\nrun_backend={backend}: service on {url}, {health['n_references']} references, ranker "
                  f"{args.ranker or health['default_ranker']}; {args.clients} clients x {args.queries} queries ...")
            latencies, errors, server_ms, wall = asyncio.run(load(url, uploads, args.clients, args.queries, fields))
            rss["after_load"] = rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(30)
    engine_line = next((line.strip() for line in Path(log.name).read_text().splitlines()
                        if "inference engine" in line), "inference engine: PyTorch")
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    server = {name: float(np.mean([t[name] for t in server_ms])) for name in ("decode", "wait", "network", "search")}
    result = {"backend": backend, "engine_log": engine_line, "clients": args.clients,
              "queries_per_client": args.queries, "k": args.k,
              "ranker": args.ranker or health["default_ranker"], "n_references": health["n_references"],
              "requests": args.clients * args.queries,
              "errors": len(errors), "error_examples": sorted(set(errors))[:5], "wall_s": wall,
              "throughput_qps": len(server_ms) / wall, "latency_s": {"p50": p50, "p95": p95, "p99": p99,
                                                                      "max": float(latencies.max())},
              "server_mean_ms": server, "rss_mb": rss,
              "rss_growth_under_load_mb": rss["after_load"] - rss["after_warmup"],
              "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    print(f"{engine_line}; server log: {log.name}; load average (1 min) {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"{len(latencies)} requests in {wall:.1f} s: {result['throughput_qps']:.1f} queries/s, "
          f"{len(errors)} errors")
    print(f"latency p50 {p50:.2f} s, p95 {p95:.2f} s, p99 {p99:.2f} s, max {latencies.max():.2f} s")
    print("server mean per query: " + ", ".join(f"{n} {v:.1f} ms" for n, v in server.items()))
    print("server RSS: " + ", ".join(f"{n} {v:.0f} MiB" for n, v in rss.items())
          + f" (growth under load {result['rss_growth_under_load_mb']:+.0f} MiB)")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--queries", type=int, default=20, help="queries per client (default 20)")
    parser.add_argument("--k", type=int, default=5, help="matches per query (default 5)")
    parser.add_argument("--ranker", help="ranker (default: the service's default)")
    parser.add_argument("--backends", default="torch,auto",
                        help="comma-separated run_backend values, measured in turn (default torch,auto)")
    args = parser.parse_args()
    if not FEATURES.is_file():
        sys.exit(f"{FEATURES} not found: run `.venv/bin/python run_pipeline.py` first")
    uploads = [(p.name, p.read_bytes()) for p in list_images(REPO / "data" / DATASET)]
    fields = {"k": str(args.k), **({"ranker": args.ranker} if args.ranker else {})}
    arms = {backend: measure(backend, uploads, fields, args) for backend in args.backends.split(",")}
    result = {"arms": arms, "cpus": len(os.sched_getaffinity(0)), "cpu": engines.cpu_info(),
              "python": platform.python_version()}
    first, *rest = arms
    for other in rest:
        ratio = arms[first]["latency_s"]["p50"] / arms[other]["latency_s"]["p50"]
        result[f"p50_{first}_over_{other}"] = ratio
        print(f"p50 latency: {first} / {other} = {ratio:.2f}x")
    fileio.save_json(RESULTS, result)
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
