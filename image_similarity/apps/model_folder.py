"""The folder of a saved :class:`.similarity_model.SimilarityModel`: written whole or not at all, read with checks.

A save goes to a new folder beside the target and is swapped in at the end, so an earlier save stays loadable until
the new one is complete (a full disk or a kill half-way leaves it as it was). The manifest ``model.json`` is
checked field by field before anything it names is read: a wrong value is refused with the file and the field, and
the network it names is a registry backbone or the folder's own ``model.pt``, never another path.
"""
import logging
import shutil
import tempfile
from pathlib import Path

from ..data.features import load_features, save_features
from ..data.fileio import load_json, save_json
from ..models import backbones
from ..search.index import KINDS, NearestNeighborIndex

__all__ = ["MODEL_FORMAT", "MANIFEST", "write_model_folder", "read_model_folder"]

logger = logging.getLogger(__name__)

MODEL_FORMAT = "image_similarity.similarity_model/2"  # 2: colour histograms (colours.npy) and colour_weight
MANIFEST, FEATURES, COLOURS, INDEX, CHECKPOINT = "model.json", "features.npy", "colours.npy", "index.faiss", "model.pt"
SIDECARS = {Path(name).with_suffix(".json").name for name in (FEATURES, COLOURS)}  # the feature stores' sidecars
FILES = {MANIFEST, FEATURES, COLOURS, INDEX, CHECKPOINT, *SIDECARS}


def _integer(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}"


# Each manifest field: (test of the value, what the value must be).
FIELDS = {
    "format": (lambda v: v == MODEL_FORMAT, repr(MODEL_FORMAT)),
    "model": (lambda v: v == CHECKPOINT or v in backbones.list_backbones(),
              f"{CHECKPOINT!r} or a backbone name ({', '.join(backbones.list_backbones())})"),
    "model_id": (lambda v: isinstance(v, str) and bool(v), "a model id (text)"),
    "backbone": (lambda v: v in backbones.list_backbones(), "a backbone name"),
    "dim": _integer(1),
    "input_resolution": _integer(1),
    "labels": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, (str, int)) for x in v)),
               "null or a list of labels"),
    "batch_size": _integer(1),
    "n_workers": _integer(0),
    "index_kind": (lambda v: v in KINDS, f"one of {KINDS}"),
    "colour_weight": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                      "a number in [0, 1)"),
}


def write_model_folder(folder, manifest, keys, features, colours, index, checkpoint=None):
    """Write a saved model to ``folder``, replacing an earlier save only once the new one is complete.

    Parameters
    ----------
    folder : str or Path
        The target; it may hold an earlier save, and nothing else.
    manifest : dict
        The fields of :data:`FIELDS` (``model`` is set here from ``checkpoint``).
    keys : list of str
    features, colours : ndarray of shape (n, D) and (n, colour.COLOUR_DIM), float32
    index : index.NearestNeighborIndex
    checkpoint : str or Path, optional
        A refined network's file, copied into the folder as ``model.pt``.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        When ``folder`` holds files that are not a saved model's (they would be lost in the swap).
    """
    folder = Path(folder)
    if folder.exists():
        strangers = sorted(p.name for p in folder.iterdir() if p.name not in FILES) if folder.is_dir() else [""]
        if strangers:
            raise ValueError(f"{folder}: holds files that are not a saved model's ({', '.join(strangers[:5])}): "
                             "save to a new folder or an earlier save's")
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        meta = {"model_id": manifest["model_id"], "backbone": manifest["backbone"]}
        save_features(new / FEATURES, keys, features, meta)
        save_features(new / COLOURS, keys, colours, meta)
        index.save(new / INDEX)
        if checkpoint is not None:
            shutil.copyfile(checkpoint, new / CHECKPOINT)
        save_json(new / MANIFEST, {**manifest, "format": MODEL_FORMAT,
                                   "model": CHECKPOINT if checkpoint is not None else manifest["model"]})
        _swap_in(new, folder)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return folder


def _swap_in(new, folder):
    """Rename ``new`` to ``folder``; an earlier ``folder`` is moved aside first and deleted after."""
    if not folder.exists():
        new.rename(folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
    folder.rename(old / folder.name)  # killed between these two renames: the earlier save is whole in there
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder):
    """The checked manifest of the saved model in ``folder``.

    Raises
    ------
    FileNotFoundError
        When there is no manifest (naming a whole earlier save left aside by an interrupted swap, if there is one).
    ValueError
        When it is not JSON, or a field is missing or out of range (naming the file and the field).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        aside = sorted(folder.parent.glob(f".{folder.name}.replaced-*/{folder.name}/{MANIFEST}"))
        hint = f"; an interrupted save left the earlier one whole in {aside[-1].parent}" if aside else ""
        raise FileNotFoundError(f"{path} not found: not a saved SimilarityModel{hint}")
    try:
        manifest = load_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a readable manifest (a JSON object was expected)")
    for field, (is_valid, expected) in FIELDS.items():
        if field not in manifest:
            raise ValueError(f"{path}: field {field!r} is missing")
        if not is_valid(manifest[field]):
            raise ValueError(f"{path}: field {field!r} must be {expected}, got {str(manifest[field])[:80]!r}")
    return manifest


def read_model_folder(folder):
    """The parts of the saved model in ``folder``, checked to belong together.

    Returns
    -------
    manifest : dict
    model : str or Path
        The backbone name, or the folder's ``model.pt``.
    stored, colours : features.Features
    index : index.NearestNeighborIndex

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`read_manifest`; ValueError also when the parts do not belong together.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = folder / CHECKPOINT if manifest["model"] == CHECKPOINT else manifest["model"]
    if backbones.model_id(model) != manifest["model_id"]:
        raise ValueError(f"{model} is {backbones.model_id(model)} but {folder} was embedded with "
                         f"{manifest['model_id']}")
    stored = load_features(folder / FEATURES, mmap=False)
    colours = load_features(folder / COLOURS, mmap=False)
    index = NearestNeighborIndex.load(folder / INDEX)
    labels = manifest["labels"]
    if (len(index) != len(stored) or colours.keys != stored.keys
            or (labels is not None and len(labels) != len(stored))):
        raise ValueError(f"{folder}: {len(stored)} feature rows, {len(colours)} colour rows, {len(index)} indexed "
                         f"vectors and {'no' if labels is None else len(labels)} labels do not belong together")
    return manifest, model, stored, colours, index
