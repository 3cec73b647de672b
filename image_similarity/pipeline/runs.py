"""A finished pipeline run, loaded from plain paths: features, the network that made them, rankers, attributes.

Step 5, A1 and the web service all start from :func:`load_run`, so they agree on which network made the stored
features (:func:`.embedder.resolve_embedder`), which rankers exist (those of step 4 only when its payloads are
there), and which ranker is recommended: :data:`PREFERRED_RANKER` (labels first, appearance within) whenever step 4
made it; without it the one 5_evaluate.py marked best on validation, else :data:`FALLBACK_RANKER`.
"""
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..search import rankers
from ..models.embedder import Embedder, resolve_embedder
from ..models.inference import InferenceConfig
from ..data.features import Features, load_features

__all__ = ["Run", "load_run", "recommended_ranker", "PREFERRED_RANKER", "FALLBACK_RANKER"]

logger = logging.getLogger(__name__)

# With a classifier: the label decides, the looks order each label (the label-only rankers order it by the classifier's
# confidence, which says nothing about appearance).
PREFERRED_RANKER = "hybrid"
FALLBACK_RANKER = "cosine"  # without a classifier (L2 ranks L2-normalised embeddings the same way)


def recommended_ranker(evaluation_csv, available, default=FALLBACK_RANKER):
    """:data:`PREFERRED_RANKER` when available; else the one 5_evaluate.py marked ``best_on_val``; else ``default``.

    Parameters
    ----------
    evaluation_csv : str or Path
        Step 5's ``evaluation.csv``; may be missing.
    available : iterable of str
        Ranker names that can be used now.
    default : str

    Returns
    -------
    str
    """
    if PREFERRED_RANKER in set(available):
        return PREFERRED_RANKER
    path = Path(evaluation_csv)
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as handle:
            best = next((row["ranker"] for row in csv.DictReader(handle) if row.get("best_on_val") == "1"), None)
        if best in set(available):
            return best
        if best is not None:
            logger.warning("%s recommends %s, which is not available: using %s", path, best, default)
    return default


@dataclass
class Run:
    """What :func:`load_run` loaded.

    Attributes
    ----------
    features : features.Features
        The stored features; their ``meta['model_id']`` names the network.
    rankers : dict of str to ranker
        ``rankers.build_rankers(...)``: the fixed ones, plus step 4's when its payloads exist.
    default_ranker : str
        The recommended ranker (:func:`recommended_ranker`).
    attributes : dict of str to attributes.AttributeModel
        The run's own attribute (its ``svm.pickle``, named after the dataset) plus the extra ones.
    notes : list of str
        What is missing, one line each.
    candidates : (str, Path, Path)
        The pretrained backbone, the refined checkpoint and the features' path, for :attr:`embedder`.
    engine : models.inference.InferenceConfig
        How the network runs (``embedder.load_embedder``).
    """

    features: Features
    rankers: dict
    default_ranker: str
    attributes: dict
    notes: list
    candidates: tuple
    engine: InferenceConfig = InferenceConfig()
    _embedder: Optional[Embedder] = None

    @property
    def model_id(self):
        """Which network made the features (``backbones.model_id``)."""
        return self.features.meta["model_id"]

    def load_network(self):
        """The network that made the features (:func:`.embedder.resolve_embedder`), loaded once."""
        if self._embedder is None:
            self._embedder = resolve_embedder(self.model_id, *self.candidates, self.engine)
        return self._embedder

    embedder = property(load_network)


def load_run(features_path, backbone, checkpoint, svm_path, classifier_path, evaluation_csv, name=None,
             attribute_paths=None, random_state=None, network=True, mmap=True, engine=None):
    """Load a run's outputs.

    Parameters
    ----------
    features_path : str or Path
        Step 3's ``features.npy``.
    backbone, checkpoint : str, Path
        The pretrained backbone and the refined checkpoint: whichever made the features is loaded.
    svm_path, classifier_path : Path
        Step 4's payloads; when one is missing its rankers are left out (said in ``notes``).
    evaluation_csv : Path
        Step 5's table, for the recommended ranker.
    name : str, optional
        The run's own attribute name (the dataset's); None: no attributes are loaded.
    attribute_paths : dict of str to path, optional
        Extra attributes ``{name: svm.pickle or classprob.pickle}`` of runs on the same network.
    random_state : int, optional
        Seeds the random baseline.
    network : bool
        Load the network now (False: on first use of ``Run.embedder``, or never when only stored features are
        ranked).
    mmap : bool
        Memory-map the feature matrix.
    engine : models.inference.InferenceConfig, optional
        How the network runs (``embedder.load_embedder``); default ``InferenceConfig()``.

    Raises
    ------
    FileNotFoundError
        When the features are missing.
    ValueError
        When the network or a payload belongs to other features.
    """
    features = load_features(features_path, mmap=mmap)
    model_id = features.meta["model_id"]
    notes, payloads = [], []
    for path in (svm_path, classifier_path):
        if Path(path).is_file():
            payloads.append(rankers.load_payload(path, model_id))
        else:
            payloads.append(None)
            notes.append(f"{path} not found: its rankers are unavailable (run 4_trainSvm.py)")
    ranker_map = rankers.build_rankers(*payloads, random_state=random_state)
    attributes = {}
    if name is not None:
        from ..apps.attributes import configured_attributes  # here: attributes bring the index (FAISS), step 5 needs neither

        attributes = configured_attributes(name, svm_path, features_path, attribute_paths)
    run = Run(features, ranker_map, recommended_ranker(evaluation_csv, ranker_map), attributes, notes,
              (backbone, checkpoint, features_path), engine or InferenceConfig())
    if network:
        run.load_network()  # now: a missing or wrong network fails before anything else
    return run
