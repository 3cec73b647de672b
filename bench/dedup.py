"""Near-duplicate detection measured: quality beside imagededup on generated copies, and grouping at scale.

**quality**: N originals drawn from a labelled image folder (after dropping images whose dhash is within 10 bits
of another's: scraped sets hold their own duplicates), 7 generated copies of each (resize 50%, JPEG quality 30,
crop 90%, horizontal flip, 90-degree turn, brightness +30%, text overlay) and M distractors (other images of the
folder, no copies). Every method links images up to each threshold of a sweep; groups are the connected
components; a predicted pair is two images in one group. Precision = true pairs among predicted ones, recall =
predicted among the true ones (same original), F1; per transform, the recall of (original, copy) pairs.
imagededup's hashing methods (64-bit hashes, its own find_duplicates) run on the same files in the same run, and
are grouped the same way. Writes bench/results/dedup_quality_<dataset>.json and the precision-recall curve PNG.

**scale**: N synthetic 256-bit hashes (uniform random bits, 1% planted copies with 1..threshold flipped bits) and
N embeddings (the Gaussian mixture of bench/search.py, 1% planted copies at cosine distance ~0.02), written as
encodings files; each arm runs in its own subprocess and reports grouping time (load + index + range search +
components), peak resident memory (ru_maxrss) and the recall of the planted pairs. Today's sklearn
radius_neighbors_graph path runs on prefixes of the same hashes, N doubling while the next run is predicted
(quadratic) to finish within --sklearn-limit seconds; FAISS brute force (IndexBinaryFlat) at --flat-n.

    python bench/dedup.py quality                                   # fashionTexture11, 100 originals: ~15 min
    python bench/dedup.py quality --dataset data/fridgeObjects --n-originals 40 --n-distractors 60   # tuning set
    python bench/dedup.py scale                                     # 1M hashes, 200k embeddings: ~20 min
    python bench/dedup.py report bench/results/dedup_quality_fashionTexture11.json   # tables at today's defaults
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from image_similarity.apps import dedup  # noqa: E402
from image_similarity.data.fileio import atomic_path, save_json  # noqa: E402
from image_similarity.data.images import list_images, load_image  # noqa: E402

RESULTS = REPO / "bench" / "results"
TEXTURES = REPO.parent / "shared" / "datasets" / "fashionTexture11"


def _crop90(img):
    dx, dy = round(img.width * 0.05), round(img.height * 0.05)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _text(img):
    draw = ImageDraw.Draw(img)
    size = max(10, img.height // 10)
    draw.text((img.width // 20, img.height - 2 * size), "(c) near-duplicate 2026", font=ImageFont.load_default(size),
              fill="white", stroke_width=max(1, size // 12), stroke_fill="black")
    return img


# name: (PIL image -> copy, file format and save options)
TRANSFORMS = {
    "resize50": (lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC), "PNG", {}),
    "jpeg30": (lambda im: im, "JPEG", {"quality": 30}),
    "crop90": (_crop90, "PNG", {}),
    "hflip": (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG", {}),
    "rot90": (lambda im: im.transpose(Image.Transpose.ROTATE_90), "PNG", {}),
    "bright130": (lambda im: ImageEnhance.Brightness(im).enhance(1.3), "PNG", {}),
    "text": (_text, "PNG", {}),
}
HASH_SWEEP = list(range(0, 129, 2))                   # bits of a 256-bit hash (128: unrelated images)
IMAGEDEDUP_SWEEP = list(range(0, 33))                 # bits of imagededup's 64-bit hashes
CNN_SWEEP = [round(t, 3) for t in np.arange(0, 0.401, 0.01)]


# ---------------------------------------------------------------------------------------------------- quality
def build_set(dataset, n_originals, n_distractors, folder, seed):
    """Write originals, copies and distractors under ``folder``; return ``{key: source id}`` (-1 = distractor)."""
    rng = np.random.default_rng(seed)
    pool = list_images(dataset)
    pool = [pool[i] for i in rng.permutation(len(pool))[:3 * (n_originals + n_distractors)]]
    encodings = dedup.encode(pool, root=dataset, progress=False)
    pairs, _ = dedup.find_links(encodings, 10, progress=False)
    clash = {encodings.keys[row] for row in np.unique(pairs.max(axis=0))}   # drop the later image of each pair
    pool = [p for p, key in zip(pool, encodings.keys) if key not in clash]
    if len(pool) < n_originals + n_distractors:
        raise SystemExit(f"only {len(pool)} distinct readable images in {dataset}")
    truth = {}
    for i, path in enumerate(pool[:n_originals + n_distractors]):
        img = load_image(path)
        if i < n_originals:
            truth[f"originals/{i:04d}.png"] = i
            img.save(folder / "originals" / f"{i:04d}.png")
            for name, (make, fmt, options) in TRANSFORMS.items():
                key = f"copies/{name}/{i:04d}.{fmt.lower().replace('jpeg', 'jpg')}"
                make(img.copy()).save(folder / key, format=fmt, **options)
                truth[key] = i
        else:
            truth[f"distractors/{i:04d}.png"] = -1 - i
            img.save(folder / "distractors" / f"{i:04d}.png")
    return truth, len(clash)


def evaluate(groups, truth):
    """Precision, recall, F1 over pairs in one group, and per-transform recall of (original, copy) pairs."""
    group_of = {key: g for g, group in enumerate(groups) for key in group}
    predicted = sum(len(group) * (len(group) - 1) // 2 for group in groups)
    correct = 0
    for group in groups:
        sources = {}
        for key in group:
            sources[truth[key]] = sources.get(truth[key], 0) + 1
        correct += sum(n * (n - 1) // 2 for n in sources.values())
    n_originals = sum(1 for key in truth if key.startswith("originals/"))
    true_pairs = n_originals * (len(TRANSFORMS) + 1) * len(TRANSFORMS) // 2
    precision, recall = (correct / predicted if predicted else 1.0), correct / true_pairs
    per_transform = {}
    for name in TRANSFORMS:
        hits = [group_of.get(key, -1) >= 0 and group_of.get(key) == group_of.get(f"originals/{truth[key]:04d}.png")
                for key in truth if key.startswith(f"copies/{name}/")]
        per_transform[name] = round(float(np.mean(hits)), 4)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "predicted_pairs": predicted, "per_transform_recall": per_transform}


def sweep(keys, pairs, distances, thresholds, truth):
    """Evaluate the groups of the links within each threshold."""
    curve = []
    for threshold in thresholds:
        kept = pairs[:, distances <= threshold]
        groups = [[keys[row] for row in rows] for rows in dedup.connected_groups(kept, len(keys))]
        curve.append({"threshold": threshold, **evaluate(groups, truth)})
    return curve


def operating_points(curve, default=None):
    """The default threshold's row and the highest-recall row at precision >= 0.99."""
    precise = [row for row in curve if row["precision"] >= 0.99]
    best = max(precise, key=lambda row: (row["recall"], -row["threshold"])) if precise else None
    at_default = next((row for row in curve if row["threshold"] == default), None) if default is not None else None
    return {"at_precision_0.99": best, "at_default": at_default}


def imagededup_links(folder, name):
    """imagededup's own encode_images and find_duplicates (at the sweep's largest threshold) as links."""
    import imagededup.methods
    method = getattr(imagededup.methods, name)(verbose=False)
    start = time.perf_counter()
    encoding_map = method.encode_images(image_dir=folder, recursive=True)
    encode_s = time.perf_counter() - start
    found = method.find_duplicates(encoding_map=encoding_map, max_distance_threshold=max(IMAGEDEDUP_SWEEP),
                                   scores=True)
    keys = sorted(encoding_map)
    row = {key: i for i, key in enumerate(keys)}
    links = [(row[a], row[b], d) for a, dups in found.items() for b, d in dups]
    pairs = np.array([[a for a, _, _ in links], [b for _, b, _ in links]], np.int64).reshape(2, -1)
    return keys, pairs, np.array([d for _, _, d in links], np.float32), encode_s


def quality(args):
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        raise SystemExit(f"{dataset} not found (fashionTexture11 lives in ../shared/datasets)")
    out = {"args": vars(args), "transforms": list(TRANSFORMS)}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        folder = Path(tmp) / "set"
        for sub in ["originals", "distractors", *(f"copies/{name}" for name in TRANSFORMS)]:
            (folder / sub).mkdir(parents=True)
        truth, n_dropped = build_set(dataset, args.n_originals, args.n_distractors, folder, args.seed)
        out.update(n_images=len(truth), n_pool_duplicates_dropped=n_dropped)
        print(f"{len(truth)} images: {args.n_originals} originals x {len(TRANSFORMS) + 1}, {args.n_distractors} "
              f"distractors ({n_dropped} near-duplicate pool images dropped first)")
        paths = sorted(folder.rglob("*.*"))
        methods = {}
        for method in args.methods:
            start = time.perf_counter()
            encodings = dedup.encode(paths, root=folder, method=method, invariant=True, progress=False,
                                     n_workers=args.workers)
            encode_s = time.perf_counter() - start
            thresholds = CNN_SWEEP if method == "cnn" else HASH_SWEEP
            for invariant in (False, True):
                used = encodings if invariant else dedup.Encodings(encodings.keys, encodings.array[:, :1],
                                                                   {**encodings.meta, "invariant": False})
                pairs, distances = dedup.find_links(used, max(thresholds), progress=False)
                curve = sweep(used.keys, pairs, distances, thresholds, truth)
                label = method + (" invariant" if invariant else "")
                methods[label] = {"encode_all_views_s": round(encode_s, 1), "curve": curve,
                                  **operating_points(curve, dedup.DEFAULT_THRESHOLDS[method])}
                _report(label, methods[label])
        try:
            import imagededup  # noqa: F401
        except ImportError:
            print("imagededup is not installed (pip install -e '.[bench]'): its arms are skipped")
            args.imagededup = []
        for name in args.imagededup:
            keys, pairs, distances, encode_s = imagededup_links(folder, name)
            if set(keys) != set(truth):
                raise RuntimeError(f"imagededup {name} encoded {len(keys)} of {len(truth)} images")
            curve = sweep(keys, pairs, distances, IMAGEDEDUP_SWEEP, truth)
            label = f"imagededup {name}"
            methods[label] = {"encode_s": round(encode_s, 1), "curve": curve,
                              **operating_points(curve, 10)}   # imagededup's default max_distance_threshold
            _report(label, methods[label])
    out["methods"] = methods
    name = Path(args.dataset).name
    written = save_json(args.out or RESULTS / f"dedup_quality_{name}.json", out)
    figure = plot_curves(methods, RESULTS / f"dedup_pr_{name}.png", f"Near-duplicates on {name}: "
                         f"{args.n_originals} originals x {len(TRANSFORMS)} copies, {args.n_distractors} distractors")
    print(f"wrote {written} and {figure}")
    print(markdown_tables(methods))


def _report(label, result):
    for point in ("at_default", "at_precision_0.99"):
        row = result[point]
        if row:
            print(f"{label:24s} {point:18s} t={row['threshold']:<6} P={row['precision']:.3f} R={row['recall']:.3f} "
                  f"F1={row['f1']:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in row["per_transform_recall"].items()))


def plot_curves(methods, path, title):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot()
    for label, result in methods.items():
        curve = result["curve"]
        ax.plot([r["recall"] for r in curve], [r["precision"] for r in curve], marker=".",
                linestyle="--" if label.startswith("imagededup") else "-", label=label)
    ax.set(xlabel="recall (pairs of copies of one original)", ylabel="precision", title=title, xlim=(0, 1),
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def markdown_tables(methods):
    lines = []
    for point, title in (("at_default", "at the default threshold"),
                         ("at_precision_0.99", "at the threshold of highest recall with precision >= 0.99")):
        lines += [f"\nRecall per transform {title}:\n",
                  "| method | threshold | precision | recall | F1 | " + " | ".join(TRANSFORMS) + " |",
                  "|---" * (5 + len(TRANSFORMS)) + "|"]
        for label, result in methods.items():
            row = result[point]
            if row:
                lines.append(f"| {label} | {row['threshold']} | {row['precision']:.3f} | {row['recall']:.3f} | "
                             f"{row['f1']:.3f} | " + " | ".join(f"{v:.2f}" for v in row["per_transform_recall"]
                                                                  .values()) + " |")
            else:
                lines.append(f"| {label} | - | never reaches 0.99 | | | " + " | ".join("" for _ in TRANSFORMS) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- scale
def _write_encodings(path, array, meta):
    """An encodings file as dedup.encode writes it: (n images, n views x width) plus the JSON sidecar."""
    np.save(path, array)
    save_json(path.with_suffix(".json"), {**meta, "n_images": len(array), "keys": [str(i) for i in range(len(array))]})


def make_hashes(path, n, threshold, rng):
    """n random 256-bit hashes, 1% of them copies of another with 1..threshold flipped bits; the planted pairs."""
    n_copies = n // 100
    bits = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    order = rng.permutation(n)                       # copies scattered through the file
    originals, copies = order[:n_copies], order[n_copies:2 * n_copies]
    for copy, original in zip(copies, originals):
        flips = rng.choice(256, rng.integers(1, threshold + 1), replace=False)
        row = np.unpackbits(bits[original])
        row[flips] ^= 1
        bits[copy] = np.packbits(row)
    _write_encodings(path, bits, {"method": "dhash", "invariant": False, "hash_size": 16, "root": None})
    return np.stack([originals, copies])


def make_embeddings(path, n, dim, rng, seed):
    """n mixture embeddings (bench/search.py), 1% copies: another row plus noise (cosine distance ~0.02)."""
    sys.path.insert(0, str(REPO / "bench"))
    from search import Mixture
    mixture = Mixture(dim, max(100, n // 1000), seed)
    writer = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))   # (n images, 1 view x dim)
    for first in range(0, n, 50_000):
        writer[first:first + 50_000] = mixture.sample(min(50_000, n - first))
    n_copies = n // 100
    order = rng.permutation(n)
    originals, copies = np.sort(order[:n_copies]), order[n_copies:2 * n_copies]
    noisy = writer[originals] + rng.standard_normal((n_copies, dim), np.float32) * (0.2 / np.sqrt(dim))
    writer[copies] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    writer.flush()
    del writer
    save_json(path.with_suffix(".json"), {"method": "cnn", "invariant": False, "model_id": "synthetic", "dim": dim,
                                          "root": None, "n_images": n, "keys": [str(i) for i in range(n)]})
    return np.stack([originals, copies])


def sklearn_groups(bits, max_distance):
    """Today's (before issue 19) step-1 path: sklearn's Hamming radius graph, then connected components."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import radius_neighbors_graph
    graph = radius_neighbors_graph(bits, radius=(max_distance + 0.5) / bits.shape[1], metric="hamming",
                                   include_self=False)
    return connected_components(graph, directed=False)[1]


def peak_rss_mb():
    """This process's resident-set high-water mark (VmHWM; ru_maxrss would include the parent's, forked before exec)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return round(int(status["VmHWM"].split()[0]) / 1024, 1)


def worker(arm, path, n, threshold, planted_path):
    """One arm, in this fresh process: group the first n encodings; print seconds, peak memory, planted recall."""
    start = time.perf_counter()
    if arm == "sklearn":
        packed = np.load(path, mmap_mode="r")[:n]
        component = sklearn_groups(np.unpackbits(packed, axis=1).astype(bool), int(threshold))
        same = lambda a, b: component[a] == component[b]  # noqa: E731
    else:
        encodings = dedup.load_encodings(path)
        if n < len(encodings):
            encodings = dedup.Encodings(encodings.keys[:n], encodings.array[:n], encodings.meta)
        if arm == "flat":
            dedup.MULTIHASH_FROM = float("inf")
        groups = dedup.find_duplicates(encodings, float(threshold) if arm == "embeddings" else int(threshold),
                                       progress=False)
        group_of = {int(key): g for g, group in enumerate(groups) for key, _ in group}
        same = lambda a, b: a in group_of and group_of.get(a) == group_of.get(b)  # noqa: E731
    seconds = time.perf_counter() - start
    planted = np.load(planted_path)
    inside = planted[:, (planted < n).all(axis=0)]
    found = sum(bool(same(int(a), int(b))) for a, b in inside.T)
    print(json.dumps({"arm": arm, "n": n, "threshold": float(threshold), "seconds": round(seconds, 2),
                      "peak_rss_mb": peak_rss_mb(),
                      "planted_pairs": int(inside.shape[1]), "planted_found": int(found),
                      "planted_recall": round(found / inside.shape[1], 5) if inside.shape[1] else None}))


def run_arm(arm, path, n, threshold, planted_path, limit):
    command = [sys.executable, __file__, "_worker", arm, str(path), str(n), str(threshold), str(planted_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        result = {"arm": arm, "n": n, "timed_out_after_s": limit}
    else:
        if done.returncode:
            raise RuntimeError(f"{arm} at n={n} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def scale(args):
    rng = np.random.default_rng(args.seed)
    out = {"args": vars(args), "cores": len(__import__("os").sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        tmp = Path(tmp)
        if "hashes" in args.arms:
            threshold = dedup.DEFAULT_THRESHOLDS["dhash"]
            hashes, planted = tmp / "hashes.npy", tmp / "hash_pairs.npy"
            np.save(planted, make_hashes(hashes, args.n_hashes, threshold, rng))
            out["hashes"] = run_arm("hashes", hashes, args.n_hashes, threshold, planted, None)
            out["flat"] = [run_arm("flat", hashes, n, threshold, planted, None) for n in args.flat_n]
            series, n = [], 1000
            while n <= args.n_hashes:
                result = run_arm("sklearn", hashes, n, threshold, planted, args.sklearn_limit)
                series.append(result)
                if "seconds" not in result or 4 * result["seconds"] > args.sklearn_limit:
                    break                                  # the next doubling would not finish in time
                n *= 2
            out["sklearn"] = series
            (tmp / "hashes.npy").unlink()
        if "embeddings" in args.arms and args.n_embeddings:
            embeddings, planted = tmp / "embeddings.npy", tmp / "embedding_pairs.npy"
            np.save(planted, make_embeddings(embeddings, args.n_embeddings, args.dim, rng, args.seed))
            out["embeddings"] = run_arm("embeddings", embeddings, args.n_embeddings, dedup.DEFAULT_THRESHOLDS["cnn"],
                                        planted, None)
    written = save_json(args.out or RESULTS / "dedup_scale.json", out)
    print(f"wrote {written}")
    print(scale_table(out))


def scale_table(out):
    rows = [("hashes: dedup (FAISS multi-index hashing)", out["hashes"])] if "hashes" in out else []
    rows += [("hashes: FAISS brute force (IndexBinaryFlat)", r) for r in out.get("flat", [])]
    rows += [("hashes: sklearn radius_neighbors_graph (before)", r) for r in out.get("sklearn", [])]
    if "embeddings" in out:
        rows.append((f"embeddings, dim {out['args']['dim']}: dedup cnn (NearestNeighborIndex)", out["embeddings"]))
    lines = ["| arm | N | grouping s | peak RSS MB | planted pairs found |", "|---|---|---|---|---|"]
    for label, r in rows:
        if "seconds" in r:
            lines.append(f"| {label} | {r['n']:,} | {r['seconds']} | {r['peak_rss_mb']:,} | "
                         f"{r['planted_found']:,} of {r['planted_pairs']:,} |")
        else:
            lines.append(f"| {label} | {r['n']:,} | > {r['timed_out_after_s']:g} (stopped) | | |")
    return "\n".join(lines)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["_worker"]:
        arm, path, n, threshold, planted = sys.argv[2:7]
        return worker(arm, path, int(n), threshold, planted)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality", help="precision/recall on generated copies, beside imagededup")
    q.add_argument("--dataset", default=str(TEXTURES), help="labelled image folder (default fashionTexture11)")
    q.add_argument("--n-originals", type=int, default=100)
    q.add_argument("--n-distractors", type=int, default=200)
    q.add_argument("--methods", nargs="+", default=list(dedup.METHODS), choices=dedup.METHODS)
    q.add_argument("--imagededup", nargs="*", default=["PHash", "DHash", "AHash", "WHash"],
                   help="imagededup hashing classes run on the same images")
    q.add_argument("--workers", type=int, default=2, help="DataLoader workers for cnn")
    s = sub.add_parser("scale", help="grouping time, memory and planted-pair recall at 1M")
    s.add_argument("--n-hashes", type=int, default=1_000_000)
    s.add_argument("--flat-n", type=int, nargs="*", default=[100_000], help="N for the FAISS brute-force arm")
    s.add_argument("--sklearn-limit", type=float, default=600, help="seconds allowed to one sklearn run")
    s.add_argument("--n-embeddings", type=int, default=200_000, help="0 = skip the embedding arm")
    s.add_argument("--dim", type=int, default=1280)
    s.add_argument("--arms", nargs="+", default=["hashes", "embeddings"], choices=["hashes", "embeddings"])
    for p in (q, s):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tmp-dir", default=None, help="where the generated files go (default: the system's)")
        p.add_argument("--out", default=None, help="JSON written (default under bench/results/)")
    r = sub.add_parser("report", help="print the markdown tables of a written JSON at today's default thresholds")
    r.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    {"quality": quality, "scale": scale, "report": report}[args.part](args)


def report(args):
    out = json.loads(args.json.read_text())
    if "methods" not in out:
        return print(scale_table(out))
    for label, result in out["methods"].items():
        method = label.split()[0]
        default = 10 if method == "imagededup" else dedup.DEFAULT_THRESHOLDS[method]
        result.update(operating_points(result["curve"], default))
    print(markdown_tables(out["methods"]))


if __name__ == "__main__":
    main()
