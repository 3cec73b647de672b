"""Overhead of featurizing on Ray Data (image_similarity.apps.scaleout) against the single-process path, in one run.

N copies (hard links) of the bundled sample photos, in a temporary folder, are embedded with the same backbone and
batch size by Embedder.embed_files (DataLoader workers decode, the model runs in this process) and by
scaleout.featurize_ray on a local Ray instance (all cores, one actor per core). The two runs alternate for --rounds
rounds and the best time of each is kept, since the machine may be shared. Ray's start-up (ray.init) is timed apart;
the Ray time includes starting the actors and loading the model in each. That fixed cost is estimated apart by a Ray
run on one image per actor (batches of 1). The two results are checked to agree.

Prints the numbers and writes bench/results/ray_featurize.json.
    python bench/ray_featurize.py [--n 20000] [--batch 64] [--workers 2] [--rounds 1]
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from image_similarity.data import fileio
from image_similarity.apps import scaleout
from image_similarity.models.embedder import load_embedder
from image_similarity.data.images import list_images

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "data" / "fridgeObjects"
RESULTS = REPO / "bench" / "results" / "ray_featurize.json"


def link_images(folder, n):
    """``n`` hard links to the sample photos, in turn."""
    sources = list_images(SAMPLE_DIR)
    paths = [folder / f"img_{i:06d}.jpg" for i in range(n)]
    for i, path in enumerate(paths):
        os.link(sources[i % len(sources)], path)
    return paths


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=20000, help="images featurized by each path")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass (run_mbSize)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the single-process path")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best time of each is kept")
    args = parser.parse_args()
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "ray": ray.__version__, "processor": platform.processor() or platform.machine(),
               "load_avg_at_start": os.getloadavg()}
    init_s, _ = timed(scaleout.init_ray)
    times = {"single_process": [], "ray_local": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = link_images(Path(tmp), args.n)
        for _ in range(args.rounds):
            seconds, (keys, single) = timed(lambda: load_embedder(args.backbone).embed_files(  # loading counts too
                paths, Path(tmp), args.batch, args.workers))
            times["single_process"].append(seconds)
            seconds, (ray_keys, on_ray, info) = timed(scaleout.featurize_ray, paths, Path(tmp), args.backbone,
                                                      args.batch)
            times["ray_local"].append(seconds)
        n_actors = info["n_actors"]
        fixed_s, _ = timed(scaleout.featurize_ray, paths[:n_actors], Path(tmp), args.backbone, 1, n_actors)
    if ray_keys != keys or len(keys) != args.n:
        raise RuntimeError(f"the two paths disagree: {len(keys)} and {len(ray_keys)} keys for {args.n} images")
    best = {k: min(v) for k, v in times.items()}
    max_diff = float(np.abs(on_ray - single).max())
    result = {
        "n_images": args.n, "backbone": args.backbone, "batch": args.batch, "workers": args.workers,
        "rounds": args.rounds, "n_actors": n_actors,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "seconds_each_round": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "images_per_s": {k: round(args.n / v, 2) for k, v in best.items()},
        "ray_init_seconds": round(init_s, 2),
        "ray_overhead_seconds": round(best["ray_local"] - best["single_process"], 2),
        "ray_fixed_seconds_estimate": round(fixed_s, 2),
        "ray_images_per_s_after_fixed": round(args.n / max(best["ray_local"] - fixed_s, 1e-9), 2),
        "ray_over_single_ratio": round(best["ray_local"] / best["single_process"], 3),
        "max_abs_difference": max_diff, "machine": machine,
        "note": (f"{args.n} images on a {os.cpu_count()}-core machine shared with other work: the fixed costs (actor "
                 "start, model load per actor) weigh more than they would on the default 20000 images"
                 if args.n < 20000 else "")}
    ray.shutdown()
    for key, value in best.items():
        print(f"{key:16} {value:8.2f} s  {args.n / value:8.2f} images/s")
    print(f"ray.init {init_s:.2f} s (not included); Ray over single process: {result['ray_over_single_ratio']} x, "
          f"{result['ray_overhead_seconds']:+.2f} s; max |difference| {max_diff:.2e}")
    print(f"Ray fixed cost (actor start + model load, {n_actors} actor(s), 1 image each) {fixed_s:.2f} s; "
          f"{result['ray_images_per_s_after_fixed']} images/s without it")
    fileio.save_json(RESULTS, result)
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
