"""Seconds per fine-tuning epoch: this project's training loop against a plain eager PyTorch loop.

Data: the tutorial's 3 texture labels (dotted, striped, leopard) of ../shared/datasets/fashionTexture11, a seeded
75% of each label (the training split's share). Both loops train the same Lite0 ImageClassifier from the same
initial weights on the same images, batch size, resolution and augmentation, for one epoch each (or --batches):

- plain: contiguous (NCHW) tensors, images decoded in the main process (workers=0), torch's default threads;
- project: ``refine.train_one_epoch`` with channels-last tensors and weights, ``rf_nrWorkers`` DataLoader worker
  processes and ``inference.set_thread_count``.

Both run in this one process, so they share its OpenMP settings (OMP_WAIT_POLICY=PASSIVE, as 2_refineDNN.py sets
it). Each first runs one untimed forward/backward pass so one-off kernel set-up is not timed.

The CPU is shared with other work whose load swings by 2-4x within minutes, so one loop after the other measures the
load more than the loops. By default the two epochs are therefore interleaved batch by batch: before each project
batch is handed to ``train_one_epoch``, one plain batch (its loading and its step) runs and is timed on its own; the
project's time is its epoch's wall time minus those pauses. Its workers keep prefetching during the pauses, as they
would during its own steps. ``--sequential`` runs the plain epoch first, then the project's. Prints the numbers and
writes bench/results/refine_speed.json, with the load average before and after.

``--bf16`` instead times the project's loop in float32 against the same loop under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (``train_one_epoch(cpu_bf16=True)``), where the CPU computes bf16
natively (``engines.native_bf16()``; elsewhere it says so and stops): each arm trains its own copy of the same
initial network on the same batches, in the order f32, bf16, f32, bf16, and the faster of each arm's two runs
counts. Writes bench/results/refine_speed_bf16.json.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as 2_refineDNN.py: before torch loads OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import helpers  # noqa: E402
from image_similarity.models import backbones, engines, refine, refine_config  # noqa: E402
from image_similarity.models.heads import ImageClassifier  # noqa: E402
from image_similarity.models.inference import set_thread_count  # noqa: E402
from image_similarity.data import fileio, images  # noqa: E402
from image_similarity.models.embedder import collate_good_bad  # noqa: E402

TEXTURES = REPO.parent / "shared" / "datasets" / "fashionTexture11"
LABELS = ("dotted", "striped", "leopard")
RESULT = REPO / "bench" / "results" / "refine_speed.json"
RESULT_BF16 = REPO / "bench" / "results" / "refine_speed_bf16.json"


def training_items(seed, ratio=0.75):
    """A seeded ``ratio`` of each label's images as (key, label_id)."""
    rng = np.random.default_rng(seed)
    items = []
    for label_id, label in enumerate(LABELS):
        keys = [images.image_key(p, TEXTURES) for p in images.list_images(TEXTURES / label)]
        keys = [keys[i] for i in rng.permutation(len(keys))[:round(ratio * len(keys))]]
        items += [(key, label_id) for key in keys]
    return items


def warm_up(model, batch, memory_format):
    """One untimed forward/backward pass: one-off kernel set-up is not part of the epoch."""
    model.train()
    loss = torch.nn.functional.cross_entropy(model(batch[0].to(memory_format=memory_format)), batch[1])
    loss.backward()
    model.zero_grad(set_to_none=True)


def plain_steps(model, dataset, indices, batch_size, lr, momentum, weight_decay):
    """The reference, one yield per batch: a textbook eager loop, NCHW tensors, data loaded in the main process."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=0, collate_fn=collate_good_bad)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    for kept, batch, _ in loader:
        labels = dataset.labels[kept]
        loss = torch.nn.functional.cross_entropy(model(batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield len(labels)


class Interleaved:
    """The project's batches, each preceded by one timed plain step (``plain_s``, ``plain_images``)."""

    def __init__(self, project_loader, plain):
        self.project_loader, self.plain = project_loader, plain
        self.dataset = project_loader.dataset
        self.plain_s, self.plain_images = 0.0, 0

    def __len__(self):
        return len(self.project_loader)

    def __iter__(self):
        for batch in self.project_loader:
            self.run_plain(1)
            yield batch
        self.run_plain(None)  # whatever the plain epoch has left

    def run_plain(self, n_steps):
        start = time.perf_counter()
        for n_images in itertools.islice(self.plain, n_steps):  # n_steps None: to the end
            self.plain_images += n_images
        self.plain_s += time.perf_counter() - start


def bf16_against_f32(initial, dataset, indices, P, resolution, warm_batch):
    """Seconds of the project's loop in f32 and under bf16 autocast, each the faster of two alternated runs."""
    cpu = torch.device("cpu")
    threads = set_thread_count()
    seconds = {"f32": [], "bf16": []}
    models = {}
    for arm in ("f32", "bf16", "f32", "bf16"):
        if arm not in models:
            models[arm] = copy.deepcopy(initial).to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm == "bf16"):
                warm_up(models[arm], warm_batch, torch.channels_last)
        optimizer = torch.optim.SGD(models[arm].parameters(), lr=P.rf_lrPerMb[0], momentum=P.rf_momentumPerMb,
                                    weight_decay=P.rf_l2RegWeight)
        loader = refine.make_loader(dataset, indices, P.rf_mbSize, P.rf_nrWorkers, cpu, seed=P.randomSeed,
                                    training=True)
        start = time.perf_counter()
        _, _, n_trained = refine.train_one_epoch(models[arm], loader, optimizer,
                                                 torch.amp.GradScaler("cpu", enabled=False), cpu, progress=False,
                                                 cpu_bf16=arm == "bf16")
        seconds[arm].append(time.perf_counter() - start)
        print(f"{arm:4}: {seconds[arm][-1]:7.1f} s ({n_trained / seconds[arm][-1]:5.2f} img/s)")
    best = {arm: min(v) for arm, v in seconds.items()}
    print(f"bf16 autocast against f32: {best['f32'] / best['bf16']:.2f}x faster ({threads} threads, "
          f"{P.rf_nrWorkers} workers, {resolution} px)")
    return {"seconds_each_run": seconds, "best_seconds": best, "bf16_speedup": best["f32"] / best["bf16"],
            "images": n_trained, "threads": threads}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=None,
                        help="time this many batches per loop instead of a whole epoch")
    parser.add_argument("--sequential", action="store_true",
                        help="run the plain epoch, then the project's, instead of interleaving their batches")
    parser.add_argument("--resolution", type=int, default=None,
                        help="input pixels (default: PARAMETERS.py's rf_inputResolution; 'auto' as step 2 chooses it)")
    parser.add_argument("--bf16", action="store_true",
                        help="time the project's loop in f32 against bf16 autocast instead (native-bf16 CPUs only)")
    args = parser.parse_args()
    if args.resolution is not None and args.resolution < 32:  # the network downsamples by 32
        parser.error(f"--resolution must be at least 32 pixels, got {args.resolution}")
    if not TEXTURES.is_dir():
        print(f"skipped: {TEXTURES} is absent (the scraped texture set is never in the repository)")
        return
    P = helpers.load_parameters()
    items = training_items(P.randomSeed)
    resolution = P.rf_inputResolution if args.resolution is None else args.resolution
    if resolution == "auto":
        resolution, _ = refine_config.auto_input_resolution_of(TEXTURES, [key for key, _ in items])
    n_images = len(items) if args.batches is None else min(len(items), args.batches * P.rf_mbSize)
    indices = refine.epoch_indices([y for _, y in items], 0, P.randomSeed)[:n_images]
    data_config = backbones.get_backbone(P.rf_backbone).data_config(resolution)
    dataset = refine.LabelledImages(TEXTURES, items, data_config.train_transform())
    torch.manual_seed(P.randomSeed)
    initial = ImageClassifier(backbones.create_model(P.rf_backbone), len(LABELS), P.rf_dropoutRate)
    kept, batch, _ = collate_good_bad([dataset[i] for i in indices[:P.rf_mbSize]])
    warm_batch = batch, dataset.labels[kept]
    cpu = torch.device("cpu")
    load_before = os.getloadavg()
    print(f"{n_images} images of {TEXTURES.name} ({', '.join(LABELS)}), {P.rf_backbone} at {resolution} px, "
          f"batches of {P.rf_mbSize}; load average before: {load_before[0]:.2f} on {os.cpu_count()} CPUs")

    if args.bf16:
        if not engines.native_bf16():
            print(f"skipped: this CPU ({engines.cpu_info()['model']}) has no native bf16; autocast would emulate it")
            return
        result = bf16_against_f32(initial, dataset, indices, P, resolution, warm_batch)
        fileio.save_json(RESULT_BF16, {**result, "backbone": P.rf_backbone, "resolution": resolution,
                                       "batch_size": P.rf_mbSize, "whole_epoch": args.batches is None,
                                       "cpu": engines.cpu_info(), "load_average_before": load_before,
                                       "load_average_after": os.getloadavg(), "torch": torch.__version__})
        print(f"wrote {RESULT_BF16}")
        return
    default_threads = torch.get_num_threads()
    plain_model = copy.deepcopy(initial)
    warm_up(plain_model, warm_batch, torch.contiguous_format)
    plain = plain_steps(plain_model, dataset, indices, P.rf_mbSize, P.rf_lrPerMb[0], P.rf_momentumPerMb,
                        P.rf_l2RegWeight)
    threads = set_thread_count()
    model = copy.deepcopy(initial).to(memory_format=torch.channels_last)
    warm_up(model, warm_batch, torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=P.rf_lrPerMb[0], momentum=P.rf_momentumPerMb,
                                weight_decay=P.rf_l2RegWeight)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = refine.make_loader(dataset, indices, P.rf_mbSize, P.rf_nrWorkers, cpu, seed=P.randomSeed, training=True)
    both = Interleaved(loader, plain)
    if args.sequential:
        both.run_plain(None)
        loader_used = loader
    else:
        loader_used = both
    start = time.perf_counter()
    _, _, n_trained = refine.train_one_epoch(model, loader_used, optimizer, scaler, cpu, progress=False)
    project_s = time.perf_counter() - start - (0.0 if args.sequential else both.plain_s)
    plain_s = both.plain_s
    mode = "sequential" if args.sequential else "interleaved batch by batch"
    print(f"plain eager loop  : {plain_s:7.1f} s ({both.plain_images / plain_s:5.1f} img/s), "
          f"{default_threads} threads, workers=0, contiguous ({mode})")
    print(f"project loop      : {project_s:7.1f} s ({n_trained / project_s:5.1f} img/s), {threads} threads, "
          f"workers={P.rf_nrWorkers}, channels_last")
    load_after = os.getloadavg()
    speedup = plain_s / project_s
    print(f"speed-up: {speedup:.2f}x (target >= 1.5x); load average after: {load_after[0]:.2f}")
    fileio.save_json(RESULT, {
        "images": n_images, "whole_epoch": args.batches is None, "mode": mode, "backbone": P.rf_backbone,
        "resolution": resolution, "batch_size": P.rf_mbSize, "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "plain": {"seconds": plain_s, "images_per_s": both.plain_images / plain_s, "threads": default_threads,
                  "workers": 0, "memory_format": "contiguous"},
        "project": {"seconds": project_s, "images_per_s": n_trained / project_s, "threads": threads,
                    "workers": P.rf_nrWorkers, "memory_format": "channels_last"},
        "speedup": speedup, "load_average_before": load_before, "load_average_after": load_after,
        "torch": torch.__version__})
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
