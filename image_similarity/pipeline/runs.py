"""A finished pipeline run, loaded from its :class:`.layout.RunLayout`: features, the network, rankers, attributes.

Step 5, A1 and the web service all start from :func:`load_run`, so they agree on which network made the stored
features (:func:`.embedder.resolve_embedder`), which rankers exist (those of step 4 only when its payloads are
there), and which ranker is recommended: :data:`PREFERRED_RANKER` (labels first, appearance within) whenever step 4
made it; without it the one step 5 recorded as best on validation (``run.json``), else :data:`FALLBACK_RANKER`.
Steps 3, 4 and the variants ask :func:`featurizing_model` which network embeds.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..search import rankers
from ..search import ranker_files
from ..models.embedder import Embedder, resolve_embedder
from ..models.inference import InferenceConfig
from ..data.features import Features, load_features
from .layout import missing_message

__all__ = ["Run", "load_run", "recommended_ranker", "featurizing_model", "PREFERRED_RANKER", "FALLBACK_RANKER"]

logger = logging.getLogger(__name__)

# With a classifier: the label decides, the looks order each label (the label-only rankers order it by the classifier's
# confidence, which says nothing about appearance).
PREFERRED_RANKER = "hybrid"
FALLBACK_RANKER = "cosine"  # without a classifier (L2 ranks L2-normalised embeddings the same way)


def recommended_ranker(record, available, default=FALLBACK_RANKER):
    """:data:`PREFERRED_RANKER` when available; else the one step 5 recorded as ``best_on_val``; else ``default``.

    Parameters
    ----------
    record : dict
        Step 5's run record (``RunLayout.load_record``); {} before step 5 ran.
    available : iterable of str
        Ranker names that can be used now.
    default : str

    Returns
    -------
    str
    """
    available = set(available)
    if PREFERRED_RANKER in available:
        return PREFERRED_RANKER
    best = record.get("best_on_val")
    if best in available:
        return best
    if best is not None:
        logger.warning("step 5 recommends %s, which is not available: using %s", best, default)
    return default


def featurizing_model(layout, backbone, refine_epochs, fallback_to_pretrained, before_step2=False):
    """The network to embed with: the refined ``layout.model``, or the pretrained ``backbone``.

    The pretrained backbone when ``refine_epochs`` is 0, when step 2 found that it ranks the validation sets better
    and ``fallback_to_pretrained`` is on, or, with ``before_step2``, when no refined network exists yet.

    Returns
    -------
    str or Path
        The backbone name or the checkpoint's path.

    Raises
    ------
    FileNotFoundError
        When the refined network is needed and missing (naming step 2).
    """
    if refine_epochs > 0 and (layout.model.exists() or not before_step2):
        if not layout.model.exists():
            raise FileNotFoundError(missing_message(layout.model, "2_refineDNN.py"))
        if fallback_to_pretrained and _refined_is_worse(layout.model):
            return backbone
        return layout.model
    return backbone


def _refined_is_worse(model_path):
    """Whether step 2 recorded in ``model_path`` that the pretrained network ranks the validation sets better."""
    from ..models.checkpoints import checkpoint_meta

    try:
        return bool(checkpoint_meta(model_path).get("pretrained_ranks_better", False))
    except ValueError:  # not a checkpoint: loading it names the file and the reason
        return False


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
        The run's own attribute (its ``svm.skops``, named after the dataset) plus the extra ones.
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


def load_run(layout, backbone, name=None, attribute_paths=None, random_state=None, network=True, mmap=True,
             engine=None):
    """Load a run's outputs.

    Parameters
    ----------
    layout : layout.RunLayout
        The run's artefacts: features, the refined checkpoint, step 4's payloads (when one is missing its rankers
        are left out, said in ``notes``) and step 5's record (for the recommended ranker).
    backbone : str
        The pretrained backbone: it or the refined checkpoint, whichever made the features, is loaded.
    name : str, optional
        The run's own attribute name (the dataset's); None: no attributes are loaded.
    attribute_paths : dict of str to path, optional
        Extra attributes ``{name: svm.skops or classprob.skops}`` of runs on the same network.
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
        When the network or a payload belongs to other features, or a payload is refused (``ranker_files.read_payload``).
    """
    features = load_features(layout.features, mmap=mmap)
    model_id = features.meta["model_id"]
    notes, payloads = [], []
    for path in (layout.svm, layout.classifier):
        if Path(path).is_file():
            payloads.append(ranker_files.load_payload(path, model_id))
        else:
            payloads.append(None)
            notes.append(f"{missing_message(path, '4_trainSvm.py')}; its rankers are unavailable")
    ranker_map = rankers.build_rankers(*payloads, random_state=random_state)
    attributes = {}
    if name is not None:
        from ..apps.attributes import configured_attributes  # here: attributes bring the index (FAISS), step 5 needs neither

        attributes = configured_attributes(name, layout.svm, layout.features, attribute_paths)
    run = Run(features, ranker_map, recommended_ranker(layout.load_record(), ranker_map), attributes, notes,
              (backbone, layout.model, layout.features), engine or InferenceConfig())
    if network:
        run.load_network()  # now: a missing or wrong network fails before anything else
    return run
