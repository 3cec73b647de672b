"""Copy detection: find each transformed copy's original among all the originals.

For every image under DIR, K copies are made (seeded, so the same DIR, K and seed give the same copies): a crop of
60-90% of each side, a rescale, colour jitter, maybe a horizontal flip, a small rotation and JPEG re-encoding at
quality 30-70. The originals are embedded with the API (``image_similarity.create``), the copies are the queries
(``SimilarityModel.query``, k = all originals); each copy's one positive is its original. Reports recall@1,
recall@10, mAP (with one positive, the mean of 1 / rank) and the time per query, for each ``--model`` (the frozen
backbone by default, or a refined ``proc/<dataset>/model.pt``) and, with ``--classprob``, the hybrid ranker of that
run (its band) on the model it was trained on. Copies go to a temporary folder and are deleted afterwards.

    python bench/copy_detection.py data/fridgeObjects --copies 2
    nice -n 10 python bench/copy_detection.py ../shared/datasets/fashionTexture11 --copies 2
"""
import argparse
import io
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import image_similarity  # noqa: E402
from image_similarity.pipeline import evaluation
from image_similarity.data import fileio
from image_similarity.search import ranker_files, rankers  # noqa: E402
from image_similarity.data.images import list_images, read_image  # noqa: E402

CROP_SIDE = (0.6, 0.9)        # fraction of each side kept by the crop
RESCALE = (0.5, 1.25)         # factor applied to the cropped image's size
JPEG_QUALITY = (30, 70)
JITTER = (0.8, 1.2)           # brightness, contrast and saturation factors
MAX_ROTATION_DEG = 10.0
KS = (1, 10)


def transformed_copy(image, rng):
    """One copy of a PIL RGB image: crop, rescale, colour jitter, maybe flip, small rotation, JPEG (PIL image)."""
    width, height = image.size
    side = rng.uniform(*CROP_SIDE)
    w, h = max(1, round(side * width)), max(1, round(side * height))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    copy = image.crop((left, top, left + w, top + h))
    scale = rng.uniform(*RESCALE)
    copy = copy.resize((max(16, round(scale * w)), max(16, round(scale * h))), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        copy = enhance(copy).enhance(rng.uniform(*JITTER))
    if rng.random() < 0.5:
        copy = ImageOps.mirror(copy)
    copy = copy.rotate(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG), Image.BICUBIC)
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def make_copies(root, keys, n_copies, out_dir, seed=0):
    """Write ``n_copies`` transformed copies of each ``root/key`` to ``out_dir``; returns [(copy path, key)].

    Each image's generator is seeded from ``seed`` and its key, so a copy does not change when other images are
    added or removed. Unreadable images are skipped (the one reader's error names them).
    """
    copies = []
    for key in keys:
        image = read_image(Path(root) / key)
        rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
        for n in range(n_copies):
            path = Path(out_dir) / f"{key.replace('/', '__')}.copy{n}.jpg"
            transformed_copy(image, rng).save(path, "JPEG", quality=95)
            copies.append((path, key))
    return copies


def ranks_of_originals(distances, originals, keys):
    """1-based rank of each query's original (row i's original is ``originals[i]``) among ``keys``."""
    column = {key: j for j, key in enumerate(keys)}
    return np.array([evaluation.positive_rank(row, np.arange(len(keys)) == column[original])
                     for row, original in zip(distances, originals)], np.int64)


def summary(ranks, seconds):
    return {**{f"recall@{k}": evaluation.top_k_accuracy(ranks, k) for k in KS},
            "map": evaluation.mean_reciprocal_rank(ranks), "n_queries": int(len(ranks)),
            "ms_per_query": 1000 * seconds / len(ranks)}


def query_ranks(model, copies, batch=256):
    """Ranks of each copy's original through ``SimilarityModel.query`` (k = all), and the seconds it took."""
    n, ranks, start = len(model), [], time.perf_counter()
    for begin in range(0, len(copies), batch):
        chunk = copies[begin:begin + batch]
        found = model.query([str(p) for p, _ in chunk], k=n)
        rank_of = {(q, ref): r for q, ref, r in zip(found["query"], found["reference"], found["rank"])}
        ranks.extend(rank_of[(str(p), key)] for p, key in chunk)
    return np.array(ranks, np.int64), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="folder of images (any depth), e.g. data/fridgeObjects")
    parser.add_argument("--copies", type=int, default=2, help="transformed copies per image (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", action="append", help="backbone name or refined model.pt; repeat for more arms "
                                                          "(default: efficientnet_lite0, the frozen embedding)")
    parser.add_argument("--classprob", type=Path, help="a run's classprob.skops (4_trainSvm.py): adds its hybrid "
                                                       "ranker on the --model it was trained on")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/copy_detection_<dir name>.json)")
    args = parser.parse_args()
    keys = [p.relative_to(args.dir).as_posix() for p in list_images(args.dir)]
    results = {"dir": str(args.dir), "n_originals": len(keys), "copies_per_image": args.copies, "seed": args.seed,
               "arms": {}}
    with tempfile.TemporaryDirectory(prefix="copy_detection_") as tmp:
        start = time.perf_counter()
        copies = make_copies(args.dir, keys, args.copies, tmp, args.seed)
        print(f"{len(copies)} copies of {len(keys)} images made in {time.perf_counter() - start:.1f} s")
        for name in args.model or ["efficientnet_lite0"]:
            start = time.perf_counter()
            model = image_similarity.create(args.dir, model=name)
            print(f"{name}: {len(model)} originals embedded in {time.perf_counter() - start:.1f} s")
            ranks, seconds = query_ranks(model, copies)
            results["arms"][f"cosine ({model.info['model_id']})"] = summary(ranks, seconds)
            payload = args.classprob and ranker_files.load_payload(args.classprob, None)
            if payload and payload.get("model_id") == model.info["model_id"] and payload.get("hybrid_band"):
                hybrid = rankers.HybridRanker(payload["ranker"], payload["hybrid_band"]).fit()
                start = time.perf_counter()
                names, matrix = model.embed([str(p) for p, _ in copies])
                distances = hybrid.distances(matrix, model.features)
                ranks = ranks_of_originals(distances, [key for _, key in copies], model.keys)
                results["arms"][f"hybrid band={hybrid.band:g} ({model.info['model_id']})"] = summary(
                    ranks, time.perf_counter() - start)
    print(f"{'arm':60} recall@1 recall@10    mAP  ms/query")
    for arm, m in results["arms"].items():
        print(f"{arm:60} {m['recall@1']:8.3f} {m['recall@10']:9.3f} {m['map']:6.3f} {m['ms_per_query']:9.1f}")
    out = args.out or REPO / "bench" / "results" / f"copy_detection_{args.dir.resolve().name}.json"
    fileio.save_json(out, results)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
