"""A Turi-Create-like similarity model: embed a set of reference images once, then query it, add to it, save it.

Example::

    import image_similarity
    model = image_similarity.create("data/fridgeObjects", label="folder")
    print(model.query("data/fridgeObjects/can/can_1.jpg", k=3))
    model.save("my_model")
    same = image_similarity.load("my_model")

The embeddings come from an :class:`.embedder.Embedder`, the answers from :func:`.core.search`, as at every door.
By default plain colour counts too (the "cosine+colour" ranker, :class:`.colour.ColourCosineRanker`): distances are
``(1 - colour_weight) * (1 - cos of the embeddings) + colour_weight * (1 - cos of the colour histograms)``, in
``[0, 2]``, lower is more similar, so a noisy white image is never a noisy black one's nearest neighbour.
:func:`open_run` opens a finished pipeline run instead, with its network, features and learned rankers.
"""
import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..models import backbones
from ..models.embedder import load_embedder
from ..data.images import ImageReadError, SkippedImages, list_images
from ..search import core
from ..search.colour import COLOUR_DIM, ColourCosineRanker, colour_histograms
from ..search.index import NearestNeighborIndex
from ..search.rankers import DEFAULT_COLOUR_WEIGHT, build_rankers
from ..data.splits import label_of
from .model_folder import MODEL_FORMAT, read_model_folder, write_model_folder

__all__ = ["SimilarityModel", "create", "load", "open_run", "MODEL_FORMAT"]

logger = logging.getLogger(__name__)

QUERY_COLUMNS = ["query", "reference", "distance", "rank"]
GRAPH_COLUMNS = ["from", "to", "distance", "rank"]
INFO_KEYS = ("model_id", "backbone", "dim", "input_resolution")


def _is_file_source(item):
    return isinstance(item, (str, os.PathLike))


def _as_list(images):
    """``(items, single)``: one image (path, PIL image, (H, W[, C]) array) becomes a one-item list."""
    if _is_file_source(images) or isinstance(images, Image.Image):
        return [images], True
    if isinstance(images, np.ndarray):
        return (list(images), False) if images.ndim == 4 else ([images], True)
    return list(images), False


def _frame(names, results, columns):
    """One row per match of :func:`.core.search`'s results (query name, reference key, distance, rank from 1)."""
    found = list(results.rows())
    return pd.DataFrame({columns[0]: [names[q] for q, *_ in found], columns[1]: [key for *_, key, _ in found],
                         columns[2]: np.array([d for *_, d in found], dtype=np.float64),
                         columns[3]: np.array([rank for _, rank, *_ in found], dtype=np.int64)}, columns=columns)


class SimilarityModel:
    """Reference images embedded once, searchable by image, with optional labels.

    Build one with :func:`create` or :func:`load`, not with the constructor.

    Parameters
    ----------
    model : str or Path
        A backbone name (``backbones.list_backbones()``) or a refined checkpoint (``proc/<dataset>/model.pt``).
    batch_size : int
        Images per forward pass.
    n_workers : int
        DataLoader processes decoding image files (0 = in this process).
    index_kind : {'auto', 'exact', 'ivf', 'hnsw'}
        Passed to :class:`.index.NearestNeighborIndex`; ``'auto'`` is exact below ``index.ANN_THRESHOLD`` references.
    inference : models.inference.InferenceConfig, optional
        Where and how the network runs (device, threads, inference engine); default ``InferenceConfig()``, as the
        rest of the library: the fastest installed engine on CPU, PyTorch on CUDA.
    colour_weight : float
        In [0, 1): the share of the colour-histogram distance in every distance (:func:`.colour.with_colour`);
        0 = the embedding alone.

    Attributes
    ----------
    keys : list of str
        One per reference: its path relative to the folder given, the path as given, or ``"0"``, ``"1"`` ... for
        in-memory images.
    features : ndarray of shape (n_references, n_dims), float32
        The embeddings (not normalised), row ``i`` for ``keys[i]``.
    colours : ndarray of shape (n_references, colour.COLOUR_DIM), float32
        Their colour histograms (:func:`.colour.colour_histograms`).
    labels : list or None
        One label per reference, or None for an unlabelled model.
    info : dict
        ``model_id``, ``backbone``, ``dim``, ``input_resolution``.
    """

    def __init__(self, model="efficientnet_lite0", batch_size=64, n_workers=2, index_kind="auto", inference=None,
                 colour_weight=DEFAULT_COLOUR_WEIGHT):
        self.model = model
        self.batch_size = batch_size
        self.n_workers = n_workers
        self.index_kind = index_kind
        self.inference = inference
        self.colour_weight = colour_weight
        self.info, self.gallery, self._embedder = None, None, None
        self.ranker = ColourCosineRanker(colour_weight)
        self.rankers, self.default_ranker = {}, None

    @classmethod
    def from_run(cls, run, image_dir=None, batch_size=64, n_workers=2):
        """The model of a finished pipeline run (:func:`.runs.load_run`): its network, features and rankers.

        Queries are then ranked exactly as A1 and the web service rank them: by ``run.default_ranker`` unless
        :meth:`query` names another of ``run.rankers`` (learned ones included), "cosine+colour" too when
        ``image_dir`` (the folder the features' keys are relative to) lets the gallery's colours be computed.
        """
        embedder = run.embedder
        model = embedder.checkpoint or embedder.backbone
        similarity = cls(model, batch_size, n_workers, inference=run.engine)
        similarity._embedder, similarity.info = embedder, embedder.info
        similarity.gallery = core.run_gallery(run.features, run.candidates[2], image_dir, run.load_network)
        similarity.rankers, similarity.default_ranker = dict(run.rankers), run.default_ranker
        return similarity

    keys = property(lambda self: [] if self.gallery is None else self.gallery.keys)
    features = property(lambda self: None if self.gallery is None else self.gallery.matrix)
    colours = property(lambda self: None if self.gallery is None else self.gallery.colour_histograms())
    labels = property(lambda self: None if self.gallery is None else self.gallery.labels)

    @property
    def index(self):
        """The :class:`.index.NearestNeighborIndex` of the references under the embedding-and-colour cosine."""
        return self.gallery.index(self.ranker, NearestNeighborIndex(self.index_kind).build)

    # ------------------------------------------------------------------ embedding
    @property
    def embedder(self):
        """The :class:`.embedder.Embedder` of ``model``, loaded on first use."""
        if self._embedder is None:
            embedder = load_embedder(self.model, self.inference)
            if self.info is not None and embedder.model_id != self.info["model_id"]:
                raise ValueError(f"{self.model} is {embedder.model_id} but the references were embedded "
                                 f"with {self.info['model_id']}")
            self._embedder, self.info = embedder, self.info or embedder.info
        return self._embedder

    def _embed_sources(self, sources, names, n_workers, skipped):
        """Embeddings (n, D) and colour histograms (n, COLOUR_DIM), float32, NaN rows for unreadable images."""
        out = np.full((len(sources), self.embedder.dim), np.nan, np.float32)
        colours = np.full((len(sources), COLOUR_DIM), np.nan, np.float32)
        for indices, rows, histograms in self.embedder.iter_batches(sources, self.batch_size, n_workers, skipped,
                                                                    names, summarize=colour_histograms):
            out[indices], colours[indices] = rows, histograms
        return out, colours

    def _embed(self, items, names, use_keys):
        """Embeddings and colour histograms in input order (NaN rows for unreadable images), and the skipped files."""
        skipped = SkippedImages()
        known = [use_keys and isinstance(x, str) and self.gallery is not None and x in self.gallery.row_of
                 for x in items]
        files = [i for i, x in enumerate(items) if not known[i] and _is_file_source(x)]
        memory = [i for i, x in enumerate(items) if not known[i] and not _is_file_source(x)]
        dim = self.info["dim"] if self.info else self.embedder.dim
        out = np.full((len(items), dim), np.nan, np.float32)
        colours = np.full((len(items), COLOUR_DIM), np.nan, np.float32)
        for i, x in enumerate(items):
            if known[i]:
                row = self.gallery.row_of[x]
                out[i], colours[i] = self.gallery.matrix[row], self.gallery.colour_histograms()[row]
        if files:
            n_workers = self.n_workers if len(files) > self.batch_size else 0
            out[files], colours[files] = self._embed_sources([Path(items[i]).absolute() for i in files], None,
                                                             n_workers, skipped)
        if memory:
            out[memory], colours[memory] = self._embed_sources([items[i] for i in memory],
                                                               [names[i] for i in memory], 0, skipped)
        return out, colours, skipped

    def embed(self, images, colours=False):
        """Embed query images.

        Parameters
        ----------
        images : str, Path, PIL.Image.Image, ndarray, or a list of them
            Image files, PIL images, or uint8 arrays of shape (H, W) or (H, W, 3|4) (a (N, H, W, 3) array is N
            images). A ``str`` equal to one of :attr:`keys` is that reference: its stored embedding is used.
        colours : bool
            Also return the images' colour histograms.

        Returns
        -------
        names : list of str
            One per readable image: the path or key as given, or the position (``"0"`` ...) of an in-memory image.
        matrix : ndarray of shape (len(names), n_dims), float32
        histograms : ndarray of shape (len(names), colour.COLOUR_DIM), float32
            Only with ``colours=True``.

        Raises
        ------
        ImageReadError
            When a single image (not a list) cannot be read, naming it and the reason. In a list, unreadable
            images are left out with one ``UserWarning`` naming each of them.
        """
        items, single = _as_list(images)
        names = [str(x) if _is_file_source(x) else str(i) for i, x in enumerate(items)]
        matrix, histograms, skipped = self._embed(items, names, use_keys=True)
        if skipped and single:
            path, reason = next(iter(skipped))
            raise ImageReadError(path, reason)
        if skipped:
            warnings.warn(f"query images: {skipped.summary()}", UserWarning, stacklevel=3)
        ok = ~np.isnan(matrix).any(axis=1)
        names = [n for n, good in zip(names, ok) if good]
        return (names, matrix[ok], histograms[ok]) if colours else (names, matrix[ok])

    # ------------------------------------------------------------------ references
    def add(self, images, label=None, keys=None):
        """Embed new reference images and append them; existing references are not recomputed.

        Parameters
        ----------
        images : folder, str, Path, PIL.Image.Image, ndarray, or a list of them
            A folder is walked recursively (``images.list_images``) and keyed by the path relative to it;
            files are keyed by the path as given; in-memory images by their number (continuing from
            ``len(self)``) unless ``keys`` are given.
        label : None, 'folder', sequence or mapping, optional
            The labels of the new images: ``'folder'`` takes the first component of each key; a sequence gives one
            label per image in input order (for a folder, the sorted order of ``list_images``); a mapping gives
            ``{key: label}``. Must be given exactly when the model is labelled.
        keys : list of str, optional
            One key per image, instead of the defaults.

        Returns
        -------
        self
            Unreadable images are skipped with one ``UserWarning`` naming them; a key already in use is a ValueError.
        """
        if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
            root = Path(images)
            items = list_images(root)
            if not items:
                raise ValueError(f"no images under {root}")
            default_keys = [p.relative_to(root).as_posix() for p in items]
        else:
            items, _ = _as_list(images)
            first = len(self.keys)
            default_keys = [str(x) if _is_file_source(x) else str(first + i) for i, x in enumerate(items)]
        keys = list(default_keys if keys is None else keys)
        if len(keys) != len(items) or not items:
            raise ValueError(f"got {len(items)} images and {len(keys)} keys: need as many keys as images, at least one")
        clashes = sorted(set(keys) & set(self.keys)) or sorted(k for k, n in Counter(keys).items() if n > 1)
        if clashes:
            raise ValueError(f"{len(clashes)} key(s) already in use, e.g. {clashes[0]!r}: pass other keys=")
        labels = self._new_labels(keys, label)
        matrix, histograms, skipped = self._embed(items, keys, use_keys=False)
        if skipped:
            warnings.warn(f"references: {skipped.summary()}", UserWarning, stacklevel=2)
        ok = ~np.isnan(matrix).any(axis=1)
        if not ok.any():
            raise ValueError(f"none of the {len(items)} images could be read: {skipped.summary()}")
        new_keys, matrix, histograms = [k for k, good in zip(keys, ok) if good], matrix[ok], histograms[ok]
        labels = None if labels is None else [lab for lab, good in zip(labels, ok) if good]
        if self.gallery is None:
            self.gallery = core.Gallery(new_keys, matrix, self.info["model_id"], labels, histograms)
        else:
            self.gallery.append(new_keys, matrix, labels, histograms)
        logger.info("added %d references (%d skipped); %d in all", len(new_keys), len(skipped), len(self.keys))
        return self

    def _new_labels(self, keys, label):
        """One label per new key, or None; refuses a mix of labelled and unlabelled references."""
        if self.keys and (label is None) != (self.labels is None):
            raise ValueError("this model is labelled: pass label= for the new images" if label is None else
                             "this model has no labels: add images without label=")
        if label is None:
            return None
        if isinstance(label, str):
            if label != "folder":
                raise ValueError(f"label must be None, 'folder', a sequence or a mapping, got {label!r}")
            return [label_of(k) for k in keys]
        if isinstance(label, Mapping):
            missing = [k for k in keys if k not in label]
            if missing:
                raise ValueError(f"label mapping has no entry for {len(missing)} image(s), e.g. {missing[0]!r}")
            return [label[k] for k in keys]
        labels = [x.item() if isinstance(x, np.generic) else x for x in label]  # plain values: saved as JSON
        if len(labels) != len(keys):
            raise ValueError(f"{len(labels)} labels for {len(keys)} images")
        return labels

    def __len__(self):
        return len(self.keys)

    # ------------------------------------------------------------------ searching
    def query(self, images, k=5, radius=None, ranker=None):
        """The ``k`` nearest references of each query image.

        Parameters
        ----------
        images : str, Path, PIL.Image.Image, ndarray, or a list of them
            See :meth:`embed`: files, reference keys, PIL images or uint8 arrays, in or out of the references.
            A single unreadable image raises ImageReadError; in a list it is left out with a warning.
        k : int
            Neighbours per query (at most ``len(self)``).
        radius : float, optional
            Largest distance kept (cosine: in [0, 2]); None keeps all ``k``.
        ranker : str, optional
            A ranker by name (``rankers.ranker_names()``; a run's learned ones after :func:`open_run`). Default: the
            run's recommended ranker for a model opened on a run, else the cosine of embedding and colour.

        Returns
        -------
        pandas.DataFrame
            Columns ``query`` (str, see :meth:`embed`), ``reference`` (key), ``distance`` (by default the cosine
            distance of embedding and colour, see the module's docstring; float64, ascending per query), ``rank``
            (1-based); one row per (query, neighbour).
        """
        scorer = self._scorer(ranker)
        names, matrix, histograms = self.embed(images, colours=True)
        if not names:
            return pd.DataFrame(columns=QUERY_COLUMNS)
        return _frame(names, core.search(self.gallery, scorer, matrix, k, histograms, radius=radius), QUERY_COLUMNS)

    def _scorer(self, name):
        """The ranker called ``name`` (:func:`.core.resolve_ranker`), or the default one."""
        if name is None:
            return self.ranker if self.default_ranker is None else self.rankers[self.default_ranker]
        return core.resolve_ranker(name, {**build_rankers(), **self.rankers})

    def similarity_graph(self, k=5, radius=None, include_self_edges=False):
        """The k-nearest-neighbour graph of the references, as an edge list.

        Parameters
        ----------
        k : int
            Edges per reference.
        radius : float, optional
            Largest cosine distance of an edge, in [0, 2].
        include_self_edges : bool
            Let a reference be one of its own ``k`` neighbours.

        Returns
        -------
        pandas.DataFrame
            Columns ``from``, ``to`` (keys), ``distance`` (cosine, float64), ``rank`` (1-based per ``from``):
            ``min(k, n - 1)`` edges per reference (``min(k, n)`` with self edges) unless ``radius`` drops some.
        """
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if include_self_edges:
            found = core.search(self.gallery, self.ranker, self.features, k, self.colours, radius=radius)
        else:
            found = core.search_keys(self.gallery, self.ranker, self.keys, k, radius=radius)
        return _frame(self.keys, found, GRAPH_COLUMNS)

    # ------------------------------------------------------------------ describing and saving
    def summary(self):
        """What the model holds.

        Returns
        -------
        dict
            ``n_references``, ``dim``, ``model`` (name or checkpoint path), ``model_id``, ``backbone``,
            ``index_kind`` (built: 'exact', 'ivf' or 'hnsw'), ``labels`` (``{label: count}`` or None).
        """
        labels = None if self.labels is None else dict(sorted(Counter(map(str, self.labels)).items()))
        return {"n_references": len(self), "dim": self.info["dim"], "model": str(self.model),
                "model_id": self.info["model_id"], "backbone": self.info["backbone"],
                "index_kind": self.index.built_kind, "labels": labels}

    def __repr__(self):
        if self.gallery is None:
            return f"SimilarityModel({self.model}, empty)"
        s = self.summary()
        labels = f", {len(s['labels'])} labels" if s["labels"] else ""
        return (f"SimilarityModel({s['n_references']} references x {s['dim']} dims, {s['backbone']} "
                f"({s['model_id']}), {s['index_kind']} index{labels})")

    def save(self, folder):
        """Write the model to ``folder``: features, colours, index, manifest and (for a refined model) the checkpoint.

        The save is written beside ``folder`` and swapped in when complete (:mod:`.model_folder`): an earlier save
        there stays loadable until then, whatever happens to this one.

        Parameters
        ----------
        folder : str or Path
            Created if needed; it may hold an earlier save, and nothing else.

        Returns
        -------
        Path
        """
        checkpoint = None if self.model in backbones.list_backbones() else self.model
        manifest = {"model": str(self.model), **{k: self.info[k] for k in INFO_KEYS}, "labels": self.labels,
                    "batch_size": self.batch_size, "n_workers": self.n_workers, "index_kind": self.index_kind,
                    "colour_weight": self.colour_weight}
        folder = write_model_folder(folder, manifest, self.keys, self.features, self.colours, self.index, checkpoint)
        logger.info("saved %s to %s", self, folder)
        return folder


def create(images, label=None, model="efficientnet_lite0", batch_size=64, keys=None, n_workers=2, index_kind="auto",
           inference=None, colour_weight=DEFAULT_COLOUR_WEIGHT):
    """Embed reference images and index them: ``SimilarityModel(model, ...).add(images, label, keys)``.

    The parameters are those of :class:`SimilarityModel` and :meth:`SimilarityModel.add`: a folder (keys relative
    to it), image files (keys as given), or PIL images / uint8 arrays (keys ``"0"``, ``"1"`` ... unless ``keys``
    are given); unreadable files are skipped with one ``UserWarning`` naming them.

    Returns
    -------
    SimilarityModel
    """
    return SimilarityModel(model, batch_size, n_workers, index_kind, inference, colour_weight).add(
        images, label=label, keys=keys)


def load(folder, inference=None):
    """Read a model written by :meth:`SimilarityModel.save`; the network is only loaded when a query needs it.

    ``inference`` is that of :func:`create`.

    Raises
    ------
    FileNotFoundError
        When ``folder`` holds no finished save (no ``model.json``).
    ValueError
        When the manifest has a missing or bad field (named), or the files do not belong together (other format,
        row counts, checkpoint of another model).
    """
    manifest, model, stored, colours, index = read_model_folder(folder)
    similarity = SimilarityModel(model, manifest["batch_size"], manifest["n_workers"], manifest["index_kind"],
                                 inference, manifest["colour_weight"])
    similarity.info = {k: manifest[k] for k in INFO_KEYS}
    similarity.gallery = core.Gallery(stored.keys, stored.matrix, manifest["model_id"], manifest["labels"],
                                      colours.matrix)
    similarity.gallery.set_index(similarity.ranker, index)
    return similarity


def open_run(proc_dir, backbone="efficientnet_lite0", image_dir=None, inference=None, random_state=None):
    """A :class:`SimilarityModel` on a finished pipeline run: it ranks like A1 and the web service.

    Parameters
    ----------
    proc_dir : str or Path
        The run's ``proc/<dataset>/``: step 3's features, the refined ``model.pt`` (when the features came from it),
        step 4's rankers and step 5's ``run.json`` (which may be missing), as :class:`.layout.RunLayout` names them.
    backbone : str
        The pretrained backbone, for features that came from it (``rf_backbone``).
    image_dir : str or Path, optional
        The folder the features' keys are relative to (``data/<dataset>/``), for the "cosine+colour" ranker.
    inference : models.inference.InferenceConfig, optional
    random_state : int, optional
        Seeds the random baseline.

    Returns
    -------
    SimilarityModel
    """
    from ..pipeline.layout import RunLayout  # here: the pipeline only for a model opened on a run
    from ..pipeline.runs import load_run

    proc_dir = Path(proc_dir)
    layout = RunLayout(proc_dir, proc_dir.parent.parent / "results" / proc_dir.name)
    run = load_run(layout, backbone, random_state=random_state, engine=inference)
    return SimilarityModel.from_run(run, image_dir)
