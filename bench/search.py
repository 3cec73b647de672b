"""Nearest-neighbour search at scale: numpy brute force, FAISS flat and the approximate (IVF) index, in one run.

Reference vectors are clustered like real embeddings: a Gaussian mixture whose centroids are the rows of
proc/fridgeObjects/features.npy plus random directions (random unit vectors when that file is absent or has another
dim), spread along a shared low-dimensional subspace plus a little isotropic noise, L2-normalised. They are generated
in chunks into a memory-mapped .npy in a temporary folder and the indexes are built from that memmap. Queries are
fresh draws from the same mixture (not in the index).

For each method: queries per second, recall@k against exact search, build time and memory (resident-set growth);
for the approximate index also the recall/speed trade-off over nprobe, the nprobe found by calibrate_recall, and the
time to add 10,000 vectors compared with a full rebuild.

    python bench/search.py --n 100000            # a couple of minutes
    python bench/search.py                       # 1M x 1280: 5.1 GB on disk, ~12 GB RAM, ~35 min on 2 cores
"""
import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from image_similarity.data.fileio import save_json  # noqa: E402
from image_similarity.search.index import ANN_THRESHOLD, NearestNeighborIndex, recall_at_k  # noqa: E402

FEATURES = REPO / "proc" / "fridgeObjects" / "features.npy"
SUBSPACE_DIMS = 32        # within-cluster variation lies mostly in a shared subspace of this many dims
SUBSPACE_SPREAD = 0.25    # standard deviation along the first subspace axis (centroids have norm 1)
ISOTROPIC_SPREAD = 0.25   # norm of the isotropic noise added to every vector


class Mixture:
    """Gaussian mixture on the unit sphere; :meth:`sample` draws ``(n, dim)`` float32 unit vectors."""

    def __init__(self, dim, n_clusters, seed):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        directions = self._unit(self.rng.standard_normal((n_clusters, dim), np.float32))
        seeds = np.load(FEATURES, mmap_mode="r") if FEATURES.is_file() else None
        if seeds is not None and seeds.ndim == 2 and seeds.shape[1] == dim:
            rows = np.asarray(seeds[np.arange(n_clusters) % len(seeds)], np.float32)
            self.centroids = self._unit(self._unit(rows) + 0.7 * directions)
            self.source = f"{FEATURES.relative_to(REPO)} rows ({len(seeds)}) + random directions"
        else:
            self.centroids = directions
            self.source = "random unit vectors" + (f" ({FEATURES.relative_to(REPO)} has dim {seeds.shape[1]})"
                                                   if seeds is not None else "")
        self.weights = self.rng.dirichlet(np.ones(n_clusters))
        self.basis = np.linalg.qr(self.rng.standard_normal((dim, SUBSPACE_DIMS)))[0].T.astype(np.float32)
        self.scales = (SUBSPACE_SPREAD / np.sqrt(1 + np.arange(SUBSPACE_DIMS) / 4)).astype(np.float32)

    @staticmethod
    def _unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def sample(self, n):
        labels = self.rng.choice(len(self.centroids), n, p=self.weights)
        x = self.centroids[labels]
        x += (self.rng.standard_normal((n, SUBSPACE_DIMS), np.float32) * self.scales) @ self.basis
        x += self.rng.standard_normal((n, self.dim), np.float32) * (ISOTROPIC_SPREAD / np.sqrt(self.dim))
        return self._unit(x)


def memory_mb():
    """Resident set and its anonymous part (excludes the memmap's page cache), in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "RssAnon")}


def measured(action):
    """Run ``action()``; return its result, seconds, and the growth of RSS / anonymous RSS in MB."""
    gc.collect()
    before, start = memory_mb(), time.perf_counter()
    result = action()
    seconds, after = time.perf_counter() - start, memory_mb()
    return result, seconds, {f"{name}_delta_mb": round(after[name] - before[name], 1) for name in before}


def timed_search(index, queries, k):
    (distances, rows), seconds, _ = measured(lambda: index.search(queries, k))
    return rows, {"queries_per_s": round(len(queries) / seconds, 1), "search_s": round(seconds, 3)}


def main(args):
    out = {"args": vars(args), "ann_threshold": ANN_THRESHOLD}
    mixture = Mixture(args.dim, args.clusters, args.seed)
    out["centroids"] = mixture.source
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        path = Path(tmp) / "references.npy"
        start = time.perf_counter()
        writer = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(args.n, args.dim))
        for first in range(0, args.n, 50_000):
            writer[first:first + 50_000] = mixture.sample(min(50_000, args.n - first))
        writer.flush()
        del writer
        references = np.load(path, mmap_mode="r")
        queries, calibration, extra = mixture.sample(args.queries), mixture.sample(200), mixture.sample(args.add)
        out["generate_s"] = round(time.perf_counter() - start, 1)
        print(f"{args.n} x {args.dim} references ({mixture.source}) written to {path} in {out['generate_s']} s")

        exact, build_s, memory = measured(lambda: NearestNeighborIndex("exact", exact_backend="numpy")
                                          .build(references))
        build = {"build_s": round(build_s, 2), **memory}
        truth = None
        for backend in ("numpy", "faiss"):
            exact.exact_backend = backend
            rows, speed = timed_search(exact, queries, args.k)
            truth = rows if truth is None else truth
            out[f"exact_{backend}"] = {**speed, "recall_at_k": recall_at_k(rows, truth), **build}
            print(f"exact {backend:5s}: {speed['queries_per_s']:9.1f} queries/s, build {build_s:.1f} s, {memory}")
        exact_qps = max(out["exact_numpy"]["queries_per_s"], out["exact_faiss"]["queries_per_s"])
        del exact
        gc.collect()

        kind = "auto" if args.n >= ANN_THRESHOLD else "ivf"
        ann, build_s, memory = measured(lambda: NearestNeighborIndex(kind).build(references))
        nlist, default_width = ann.n_lists, ann.search_width
        out["ann"] = {"kind": ann.built_kind, "nlist": nlist, "build_s": round(build_s, 2), **memory, "sweep": []}
        print(f"{ann.built_kind} index, nlist {nlist}: built in {build_s:.1f} s, {memory}")
        for width in sorted({default_width, *[2 ** i for i in range(12) if 2 ** i <= max(nlist // 8, 1)]}):
            ann.search_width = width
            rows, speed = timed_search(ann, queries, args.k)
            point = {"nprobe": width, "recall_at_k": round(recall_at_k(rows, truth), 4), **speed,
                     "speedup_vs_exact": round(speed["queries_per_s"] / exact_qps, 1)}
            out["ann"]["sweep"].append(point)
            print(f"  nprobe {width:4d}: recall@{args.k} {point['recall_at_k']:.4f}, "
                  f"{speed['queries_per_s']:9.1f} queries/s ({point['speedup_vs_exact']}x exact)")
        ann.search_width = default_width
        out["ann"]["default"] = next(p for p in out["ann"]["sweep"] if p["nprobe"] == default_width)
        ann.search_width = 1
        calibrated_recall, calibrate_s, _ = measured(lambda: ann.calibrate_recall(calibration, args.target, args.k))
        rows, speed = timed_search(ann, queries, args.k)
        out["ann"]["calibrated"] = {"nprobe": ann.search_width, "calibration_recall": round(calibrated_recall, 4),
                                    "calibrate_s": round(calibrate_s, 1),
                                    "recall_at_k": round(recall_at_k(rows, truth), 4), **speed,
                                    "speedup_vs_exact": round(speed["queries_per_s"] / exact_qps, 1)}
        print(f"calibrate_recall(target {args.target}): nprobe {ann.search_width} in {calibrate_s:.1f} s, "
              f"held-out recall {out['ann']['calibrated']['recall_at_k']:.4f}, {speed['queries_per_s']:.1f} queries/s")

        n_before = len(ann)
        _, add_s, _ = measured(lambda: ann.add(extra))
        found = ann.search(extra[:100], 1)[1][:, 0]
        out["add"] = {"vectors": args.add, "add_s": round(add_s, 3), "rebuild_s": out["ann"]["build_s"],
                      "fraction_of_rebuild": round(add_s / build_s, 4),
                      "added_found_as_own_neighbour": float(np.mean(found == n_before + np.arange(100)))}
        print(f"add {args.add} vectors: {add_s:.2f} s = {100 * add_s / build_s:.2f}% of a rebuild "
              f"({build_s:.1f} s); {out['add']['added_found_as_own_neighbour']:.0%} found as their own neighbour")
    written = save_json(args.out, out)
    print(f"wrote {written}")
    calibrated = out["ann"]["calibrated"]
    print(f"summary: N={args.n}, exact {exact_qps:.0f} q/s (numpy {out['exact_numpy']['queries_per_s']:.0f}, "
          f"faiss {out['exact_faiss']['queries_per_s']:.0f}); {ann.built_kind} nprobe {calibrated['nprobe']}: "
          f"recall@{args.k} {calibrated['recall_at_k']:.3f} at {calibrated['speedup_vs_exact']}x exact; add = "
          f"{100 * out['add']['fraction_of_rebuild']:.2f}% of rebuild")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="reference vectors")
    parser.add_argument("--dim", type=int, default=1280, help="vector length")
    parser.add_argument("--queries", type=int, default=1000, help="held-out query vectors")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--clusters", type=int, default=1000, help="mixture components")
    parser.add_argument("--add", type=int, default=10_000, help="vectors added to the built approximate index")
    parser.add_argument("--target", type=float, default=0.95, help="recall@k that calibrate_recall aims for")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--tmp-dir", default=None, help="folder for the temporary memmap (default: system temp)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "search.json"), help="JSON written")
    main(parser.parse_args())
