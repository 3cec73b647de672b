"""Featurization spread over a Ray cluster (or all local cores) with Ray Data, giving what one process gives.

The file list becomes a Ray dataset (``ray.data.from_items``); ``map_batches`` sends batches of ``batch_size`` paths
to a pool of actors, each of which loads the model once and runs :meth:`embedder.Embedder.embed_files` on its batch,
so the decoding (:func:`images.load_image`), the backbone's eval transform and the forward pass are the
single-process code itself. Rows come back tagged with their index in the file list, so keys and order are those of the input however
the cluster schedules the batches; unreadable images come back with their reason.

Ray is an optional dependency (``pip install .[scale]``): it is imported when a function here is called, not when
this module is imported. With ``RAY_ADDRESS`` set (``auto``, ``ray://host:10001`` ...) the work goes to that cluster;
its nodes need this package installed and the image files (and a checkpoint) at the same paths (a shared file system).
"""
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..models.backbones import list_backbones
from ..models.embedder import load_embedder
from ..models.inference import InferenceConfig
from ..data.images import SkippedImages, image_key

__all__ = ["init_ray", "featurize_ray"]

logger = logging.getLogger(__name__)


def init_ray(address=None, num_cpus=None):
    """Connect to a Ray cluster, or start a local instance; does nothing when Ray is already initialised.

    Parameters
    ----------
    address : str, optional
        Cluster address (``"auto"``, ``"ray://host:10001"``); default the ``RAY_ADDRESS`` environment variable, and
        when that is unset too, a local instance without dashboard or usage reporting (no network).
    num_cpus : int, optional
        CPUs of the local instance; default ``os.cpu_count()``. Ignored when connecting to a cluster.

    Returns
    -------
    str
        Where the work will run: the address, ``"local"``, or ``"the running instance"`` when Ray was already
        initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return "the running instance"
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray reports usage statistics over the network unless told not to; the variable is read by the processes it starts.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)  # no other options: a ray:// client would forward them to the cluster's ray.init
        logger.info("connected to the Ray cluster at %s (%s)", address, ray.cluster_resources())
        return address
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    logger.info("started a local Ray instance with %s CPUs", num_cpus or os.cpu_count())
    return "local"


class _BatchEmbedder:
    """A Ray Data actor: loads the model once (on ``inference``, whose ``threads`` are its CPUs), then embeds batches
    of ``{"index", "path"}`` rows.

    Each output row is ``index`` (int64), ``vector`` ((D,) float32; zeros for an unreadable image) and ``reason``
    (str; empty for a readable one).
    """

    def __init__(self, model, root, inference):
        self.embedder = load_embedder(model, inference)
        self.root = root

    def __call__(self, batch):
        paths = [Path(p) for p in batch["path"]]
        position = {image_key(p, self.root): n for n, p in enumerate(paths)}
        skipped = SkippedImages()
        keys, rows = self.embedder.embed_files(paths, self.root, batch_size=len(paths), n_workers=0, skipped=skipped)
        vectors = np.zeros((len(paths), self.embedder.dim), np.float32)
        vectors[[position[k] for k in keys]] = rows
        reasons = [skipped.items.get(str(p), "") for p in paths]
        return {"index": np.asarray(batch["index"], np.int64), "vector": vectors,
                "reason": np.array(reasons, dtype=object)}


def featurize_ray(paths, root, model, batch_size=64, n_actors=None, cpus_per_actor=1, skipped=None, inference=None):
    """Embed image files on Ray (local or cluster, see :func:`init_ray`, called here if needed).

    Parameters
    ----------
    paths : list of Path
        Image files under ``root``, readable at these paths on every Ray node.
    root : Path
        Keys are the paths relative to it, with forward slashes.
    model : str or Path
        A backbone name or a refined checkpoint path (readable on every node); each actor loads it once.
    batch_size : int
        Images per actor call and per forward pass.
    n_actors : int, optional
        Actors running the model; default the cluster's CPUs divided by ``cpus_per_actor`` (at least 1).
    cpus_per_actor : int
        CPUs reserved by each actor, and the threads it runs (its ``InferenceConfig.threads``).
    skipped : SkippedImages, optional
        Receives every unreadable file with its reason.
    inference : models.inference.InferenceConfig, optional
        Device and inference engine of every actor (``embedder.load_embedder``); an engine's export is made here,
        once. Default ``InferenceConfig()``.

    Returns
    -------
    keys : list of str
        One per readable image, in the order of ``paths``.
    matrix : ndarray of shape (len(keys), D), float32
        Gathered on this (the driver) machine: N x D x 4 bytes.
    info : dict
        The embedder's ``model_id``, ``backbone``, ``dim``, ``input_resolution`` (loaded here once to check the model
        before any work is sent out), and ``n_actors``, the actors that ran it.
    """
    import ray

    init_ray()
    inference = inference or InferenceConfig()
    info = load_embedder(model, inference).info
    paths = [Path(p) for p in paths]
    keys = [image_key(p, root) for p in paths]
    if not paths:
        return [], np.empty((0, info["dim"]), np.float32), {**info, "n_actors": 0}
    if n_actors is None:
        n_actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
    n_actors = max(1, min(n_actors, -(-len(paths) // batch_size)))
    context = ray.data.DataContext.get_current()
    bars_before, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        dataset = ray.data.from_items([{"index": i, "path": str(p.absolute())} for i, p in enumerate(paths)],
                                      override_num_blocks=-(-len(paths) // batch_size))
        # Absolute paths: the actors' working folder need not be this one.
        model_ref = model if isinstance(model, str) and model in list_backbones() else str(Path(model).absolute())
        embedded = dataset.map_batches(_BatchEmbedder,
                                       fn_constructor_args=(model_ref, str(Path(root).absolute()),
                                                            dataclasses.replace(inference, threads=cpus_per_actor)),
                                       batch_size=batch_size, batch_format="numpy",
                                       compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus_per_actor)
        matrix = np.empty((len(paths), info["dim"]), np.float32)
        reasons = {}
        with tqdm(total=len(paths), unit="img", desc="featurize (ray)", disable=None) as bar:
            for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                bad = batch["reason"] != ""
                matrix[batch["index"][~bad]] = batch["vector"][~bad]
                reasons.update(zip(batch["index"][bad].tolist(), batch["reason"][bad].tolist()))
                bar.update(len(batch["index"]))
    finally:
        context.enable_progress_bars = bars_before
    for i in sorted(reasons):
        if skipped is not None:
            skipped.add(paths[i], reasons[i])
    good = [i for i in range(len(paths)) if i not in reasons]
    logger.info("featurized %d of %d images with %s on Ray, %d actor(s) (%d skipped)", len(good), len(paths),
                info["model_id"], n_actors, len(reasons))
    return [keys[i] for i in good], (matrix if not reasons else matrix[good]), {**info, "n_actors": n_actors}
