"""Featurization throughput and memory, measured in one run on the same images.

Throughput (default): N copies of the bundled sample photos, resized to --size pixels on the long side and written
as JPEG to a temporary folder, are embedded with the same backbone at --resolution (default: the backbone's own):
  1. tutorial: one image at a time, PyTorch eager, default memory format, torchvision's Resize + CenterCrop (the
     2017 tutorial's loop);
  2. forward_<arm>: Embedder.forward_batch alone on pre-decoded tensors in batches of --batch, i.e. the ceiling for
     (3), for each arm: torch (channels-last, inference mode), and every installed engine of image_similarity.models.engines
     in f32 (openvino, onnxruntime), plus openvino in bf16 where the CPU has native bf16;
  3. project_<arm>: Embedder.embed_files end to end from the files (DataLoader workers decode while the network
     runs), what 3_featurizeImages.py runs, for each arm.
All arms alternate for --rounds rounds and the best rate of each is kept, since the machine may be shared.
"auto" is the arm run_backend="auto" picks. Then the forward alone by batch size (1-32) for torch in both memory
formats and for the auto engine, which is how run_mbSize was chosen; the auto engine's forward by chunk size and its
end to end by loader workers (how engines.CHUNK_IMAGES and run_nrWorkers were chosen); and the preprocessing cost
per image in one thread: decoding plus torchvision's Resize + CenterCrop + ToTensor + Normalize against decoding plus
backbones.EvalTransform.to_uint8 (one resize of the crop's pixels, uint8 out), which is what the workers run.
The CPU model and its vector flags are reported with the numbers.
Memory (--memory N): features.featurize_to_file on N hard links to the sample photos, sampling the resident memory of
this process and its workers every 0.5 s against the number of rows already written.

Prints the numbers and writes bench/results/featurize.json (the memory run adds a "memory" entry).
    python bench/featurize.py [--n 200] [--size 500] [--batch 16] [--workers 2] [--resolution 320]
    python bench/featurize.py --memory 20000
"""
import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from image_similarity.models import backbones, engines
from image_similarity.data import features, fileio  # noqa: E402
from image_similarity.models.embedder import Embedder, load_embedder  # noqa: E402
from image_similarity.models.inference import InferenceConfig, set_thread_count  # noqa: E402
from image_similarity.data.images import list_images, read_image  # noqa: E402

SAMPLE_DIR = REPO / "data" / "fridgeObjects"
RESULTS = REPO / "bench" / "results" / "featurize.json"


def make_images(folder, n, size):
    """``n`` JPEGs: the sample photos in turn, resized so the long side is ``size`` pixels."""
    sources = list_images(SAMPLE_DIR)
    paths = []
    for i in range(n):
        image = read_image(sources[i % len(sources)])
        scale = size / max(image.size)
        path = folder / f"img_{i:05d}.jpg"
        image.resize((round(image.width * scale), round(image.height * scale))).save(path, quality=90)
        paths.append(path)
    return paths


def tutorial_loop(paths, net, transform):
    with torch.no_grad():
        start = time.perf_counter()
        for path in paths:
            net(transform(read_image(path))[None])
    return len(paths) / (time.perf_counter() - start)


def forward_only(batches, embedder):
    """Images/s of ``embedder.forward_batch`` alone on prepared batches."""
    start = time.perf_counter()
    for batch in batches:
        embedder.forward_batch(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def torch_contiguous(batches, net):
    """Images/s of the PyTorch forward on NCHW (contiguous) batches: the memory-format check."""
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            net(batch.contiguous())
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def preprocess_ms(paths, transform, rounds=3):
    """Best milliseconds per image, over ``rounds``, to decode a file and apply ``transform``, in this thread."""
    best, threads = float("inf"), torch.get_num_threads()
    set_thread_count(1)  # as in a DataLoader worker
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            transform(read_image(path))
        best = min(best, (time.perf_counter() - start) / len(paths) * 1000)
    set_thread_count(threads)
    return round(best, 2)


def project_path(paths, root, embedder, batch_size, n_workers):
    start = time.perf_counter()
    keys, _ = embedder.embed_files(paths, root, batch_size, n_workers)
    assert len(keys) == len(paths)
    return len(paths) / (time.perf_counter() - start)


def arms_at(name, resolution):
    """``{arm: Embedder}`` at ``resolution``: PyTorch, each installed engine in f32, OpenVINO bf16 where native."""
    data_config = backbones.get_backbone(name).data_config(resolution)
    wanted = [("torch", "torch", "f32"), ("openvino", "openvino", "f32"), ("onnxruntime", "onnxruntime", "f32")]
    if engines.native_bf16():
        wanted.append(("openvino_bf16", "openvino", "bf16"))
    net = backbones.create_model(name)
    arms = {}
    for arm, backend, precision in wanted:
        embedder = Embedder(net, data_config, backbones.model_id(name), name, device="cpu").use_engine(
            InferenceConfig(backend, precision, "cpu"))
        got = "torch" if embedder.engine is None else embedder.engine.name
        if (got, "f32" if embedder.engine is None else embedder.engine.precision) == (backend, precision):
            arms[arm] = embedder
        else:
            print(f"arm {arm}: not available here ({embedder.runs_on} instead), left out")
    auto = Embedder(net, data_config, backbones.model_id(name), name, device="cpu").use_engine(
        InferenceConfig("auto", "f32", "cpu"))
    chosen = "torch" if auto.engine is None else auto.engine.name
    return arms, chosen


def throughput(paths, root, name, resolution, batch_size, n_workers, rounds, sweep_sizes=(1, 4, 8, 16, 32)):
    """Best images/s of each arm over ``rounds`` alternating rounds (the machine may be shared: best of is fairest).

    Returns
    -------
    runs : dict of str to list of float
        Images/s of each arm, one per round.
    chosen : str
        The arm ``run_backend="auto"`` runs.
    streams : int
        Forward passes that arm runs at once.
    sweep : dict of str to dict of int to float
        Forward-only images/s per batch size in ``sweep_sizes`` on the first 32 decoded images: torch channels-last
        (as the Embedder runs it), torch contiguous, and the chosen engine; for an engine also its forward by chunk
        size (``engines.CHUNK_IMAGES``) and its end-to-end rate by number of loader workers.
    preprocessing : dict of str to float
        Milliseconds per image to decode and preprocess, torchvision's two steps against ``EvalTransform.to_uint8``.
    """
    plain = backbones.create_model(name)
    reference = backbones.get_backbone(name).data_config(resolution).torchvision_eval_transform()
    arms, chosen = arms_at(name, resolution)
    transform = arms["torch"].transform
    tensors = torch.stack([transform(read_image(p)) for p in paths])
    batches = [tensors[i:i + batch_size] for i in range(0, len(tensors), batch_size)]
    tutorial_loop(paths[:2], plain, reference)  # warm-up
    for embedder in arms.values():
        forward_only(batches[:1], embedder)
    runs = {"tutorial_one_at_a_time": []}
    for _ in range(rounds):
        runs["tutorial_one_at_a_time"].append(tutorial_loop(paths, plain, reference))
        for arm, embedder in arms.items():
            runs.setdefault(f"forward_{arm}", []).append(forward_only(batches, embedder))
            runs.setdefault(f"project_{arm}", []).append(project_path(paths, root, embedder, batch_size, n_workers))
    sample = tensors[:32]
    by_size = {size: [sample[i:i + size] for i in range(0, len(sample), size)] for size in sweep_sizes}
    sweep = {"torch_channels_last": {s: round(forward_only(b, arms["torch"]), 2) for s, b in by_size.items()},
             "torch_contiguous": {s: round(torch_contiguous(b, plain), 2) for s, b in by_size.items()},
             chosen: {s: round(forward_only(b, arms[chosen]), 2) for s, b in by_size.items()}}
    if chosen != "torch":  # how engines.CHUNK_IMAGES was chosen: batches of --batch cut into chunks over the streams
        default_chunk = engines.CHUNK_IMAGES
        sweep[f"{chosen}_by_chunk_of_batch_{batch_size}"] = {}
        for chunk in (1, 2, 4, 8, 16):
            engines.CHUNK_IMAGES = chunk
            sweep[f"{chosen}_by_chunk_of_batch_{batch_size}"][chunk] = round(forward_only(batches, arms[chosen]), 2)
        engines.CHUNK_IMAGES = default_chunk
        sweep[f"project_{chosen}_by_workers"] = {
            w: round(project_path(paths, root, arms[chosen], batch_size, w), 2) for w in (0, 1, 2)}
    preprocessing = {"torchvision_resize_crop_float32": preprocess_ms(paths[:100], reference),
                     "one_step_crop_resize_uint8": preprocess_ms(paths[:100], transform.to_uint8)}
    return runs, chosen, getattr(arms[chosen].engine, "streams", 1), sweep, preprocessing


def _rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid):
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def memory_run(n, name, batch_size, n_workers):
    """Featurize ``n`` hard links into a .npy and sample RSS (MB) against rows written; returns the samples."""
    sources = list_images(SAMPLE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "imgs", Path(tmp) / "out" / "features.npy"
        root.mkdir()
        paths = []
        for i in range(n):
            paths.append(root / f"img_{i:06d}.jpg")
            os.link(sources[i % len(sources)], paths[-1])
        embedder = load_embedder(name, InferenceConfig(device="cpu"))
        samples, done = [], threading.Event()
        dim = embedder.dim

        def sample():
            while not done.wait(0.5):
                partial = list(out.parent.glob(".features.npy.*.tmp")) if out.parent.is_dir() else []
                rows = max(0, (partial[0].stat().st_size - 128) // (4 * dim)) if partial else 0
                main = _rss_mb(os.getpid())
                workers = sum(_rss_mb(c) for c in _children(os.getpid()))
                samples.append({"t_s": round(time.perf_counter() - start, 1), "rows_written": int(rows),
                                "rss_main_mb": round(main, 1), "rss_workers_mb": round(workers, 1)})

        start = time.perf_counter()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        stored = features.featurize_to_file(paths, root, embedder, out, batch_size, n_workers)
        done.set()
        thread.join()
        elapsed = time.perf_counter() - start
        assert stored.matrix.shape == (n, dim)
    return {"n_images": n, "seconds": round(elapsed, 1), "images_per_s": round(n / elapsed, 2),
            "in_ram_matrix_would_need_mb": round(n * dim * 4 / 2**20, 1), "samples": samples}


def peak_rss_by_quarter(samples, n):
    """Highest main-process RSS (MB) while each quarter of the ``n`` rows was being written: flat if it does not grow."""
    quarters = [[] for _ in range(4)]
    for sample in samples:
        if sample["rows_written"] > 0:
            quarters[min(3, 4 * (sample["rows_written"] - 1) // n)].append(sample["rss_main_mb"])
    return [max(q) if q else None for q in quarters]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=200, help="images for the throughput comparison")
    parser.add_argument("--size", type=int, default=500, help="long side of the generated JPEGs, pixels")
    parser.add_argument("--batch", type=int, default=16, help="batch size for (2) and (3), as run_mbSize")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each way is kept")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (3)")
    parser.add_argument("--resolution", type=int,
                        help="input pixels (default: the backbone's own, as step 3 embeds with the pretrained network)")
    parser.add_argument("--memory", type=int, metavar="N", help="run the memory check on N images instead")
    args = parser.parse_args()
    resolution = args.resolution or backbones.get_backbone(args.backbone).input_size
    results = fileio.load_json(RESULTS) if RESULTS.exists() else {}
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "processor": platform.processor() or platform.machine(), "cpu": engines.cpu_info(),
               "native_bf16": engines.native_bf16(), "load_avg_at_start": os.getloadavg()}
    print(f"CPU: {machine['cpu']['model']}, {machine['cpu_count']} cores, flags {' '.join(machine['cpu']['flags'])}; "
          f"native bf16: {machine['native_bf16']}; load average {machine['load_avg_at_start'][0]:.2f}")
    if args.memory:
        result = memory_run(args.memory, args.backbone, args.batch, args.workers)
        rss = [s["rss_main_mb"] for s in result["samples"] if s["rows_written"] > 0]
        print(f"{args.memory} images in {result['seconds']} s ({result['images_per_s']} img/s); main-process RSS "
              f"while writing: first {rss[0] if rss else 'n/a'} MB, max {max(rss) if rss else 'n/a'} MB; an in-RAM "
              f"matrix would need {result['in_ram_matrix_would_need_mb']} MB")
        result["peak_rss_main_mb_by_quarter"] = peak_rss_by_quarter(result["samples"], args.memory)
        print(f"peak main-process RSS in each quarter of the rows: {result['peak_rss_main_mb_by_quarter']} MB")
        for s in result["samples"][::max(1, len(result["samples"]) // 10)]:
            print(f"  t={s['t_s']:7.1f} s  rows={s['rows_written']:7d}  rss main={s['rss_main_mb']:7.1f} MB  "
                  f"workers={s['rss_workers_mb']:7.1f} MB")
        results["memory"] = {**result, "backbone": args.backbone, "batch": args.batch, "workers": args.workers,
                             "machine": machine}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_images(Path(tmp), args.n, args.size)
            runs, chosen, streams, sweep, preprocessing = throughput(paths, Path(tmp), args.backbone, resolution,
                                                                     args.batch, args.workers, args.rounds)
        rates = {k: max(v) for k, v in runs.items()}
        tutorial = rates["tutorial_one_at_a_time"]
        ratios = {f"project_{chosen}_vs_tutorial": rates[f"project_{chosen}"] / tutorial,
                  f"project_{chosen}_vs_forward_{chosen}": rates[f"project_{chosen}"] / rates[f"forward_{chosen}"],
                  **{f"{k}_vs_tutorial": v / tutorial for k, v in rates.items() if k.startswith("project_")}}
        print(f"{resolution} px, batches of {args.batch}, {args.workers} workers; run_backend='auto' runs {chosen} "
              f"({streams} streams)")
        for key, value in rates.items():
            print(f"{key:30} {value:8.2f} images/s")
        for key, value in ratios.items():
            print(f"{key:40} {value:8.2f} x")
        for arm, rates_by_size in sweep.items():
            by = "" if "_by_" in arm else " by batch size"  # the engine's own sweeps name what they vary
            print(f"{arm}, images/s{by}: "
                  + ", ".join(f"{k}: {v}" for k, v in rates_by_size.items()))
        print("decode + preprocess, ms per image in one thread: "
              + ", ".join(f"{k} {v}" for k, v in preprocessing.items()))
        machine["load_avg_at_end"] = os.getloadavg()
        results["throughput"] = {"images_per_s": {k: round(v, 2) for k, v in rates.items()},
                                 "images_per_s_each_round": {k: [round(x, 2) for x in v] for k, v in runs.items()},
                                 "auto_runs": chosen, "auto_streams": streams,
                                 "ratios": {k: round(v, 3) for k, v in ratios.items()},
                                 "forward_images_per_s_by_batch_size": sweep,
                                 "decode_preprocess_ms_per_image": preprocessing,
                                 "n_images": args.n, "rounds": args.rounds, "long_side_px": args.size,
                                 "resolution": resolution, "backbone": args.backbone,
                                 "batch": args.batch, "workers": args.workers, "machine": machine}
    fileio.save_json(RESULTS, results)
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
