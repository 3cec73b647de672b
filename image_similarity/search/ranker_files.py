"""Learned rankers on disk and in the database: one way to save them, read back without running code.

Step 4 writes its rankers with :func:`save_payload`, the SQL variant stores the same bytes (:func:`payload_bytes`)
in its ``model`` table, and every reader goes through :func:`read_payload`: a skops archive loaded with an explicit
allow-list of types, so a crafted file is refused instead of run; a pickle of an older version is named with the
step that writes the new format.
"""
import zipfile
from pathlib import Path

import skops.io
from skops.io.exceptions import UntrustedTypesFoundException

from . import rankers
from ..data.fileio import atomic_write_bytes, refuse_pickle

__all__ = ["TRUSTED_TYPES", "payload_bytes", "read_payload", "save_payload", "load_payload"]

# What a ranker file may hold besides the plain data and the sklearn estimators skops trusts itself (LinearSVC,
# LogisticRegression, FrozenEstimator ...): the learned rankers and the calibration parts they keep. skops refuses
# any other type instead of building it, so loading never runs code from the file.
TRUSTED_TYPES = [f"{rankers.__name__}.{name}" for name in ("WeightedL2Ranker", "CalibratedRanker", "ClassProbRanker")] + [
    "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration"]


def payload_bytes(model_id, **contents):
    """Fitted rankers and their facts, with the ``model_id`` of the features they were trained on, as skops bytes.

    Step 4 writes them to a file (:func:`save_payload`), the SQL variant into its ``model`` table: the same bytes.
    """
    return skops.io.dumps({"model_id": model_id, **contents})


def read_payload(data, source, model_id=None, written_by="4_trainSvm.py"):
    """The payload in :func:`payload_bytes`' ``data``, refused unless it holds only :data:`TRUSTED_TYPES`.

    Parameters
    ----------
    data : bytes
    source : str or Path
        Where ``data`` came from (a file, a table row): every error names it.
    model_id : str, optional
        The features' model id the rankers must have been trained on; None: not checked.
    written_by : str
        The step that writes ``data``, named in the errors.

    Raises
    ------
    ValueError
        For a pickle of an older version, a file that is not a ranker payload, a type outside the allow-list, or
        rankers trained on another model's features.
    """
    refuse_pickle(data, source, written_by)
    try:
        payload = skops.io.loads(data, trusted=TRUSTED_TYPES)
    except UntrustedTypesFoundException as err:
        raise ValueError(f"{source} refused: it holds types that are not the project's rankers ({err})") from None
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{source}: not a ranker payload written by {written_by} ({err})") from None
    if not isinstance(payload, dict) or "model_id" not in payload:
        raise ValueError(f"{source}: not a ranker payload written by {written_by}")
    if model_id is not None and payload["model_id"] != model_id:
        raise ValueError(f"{source} was trained on features of {payload['model_id']} but the features now come from "
                         f"{model_id}: run {written_by} again")
    return payload


def save_payload(path, model_id, **contents):
    """Write :func:`payload_bytes` to ``path`` (atomically)."""
    return atomic_write_bytes(path, payload_bytes(model_id, **contents))


def load_payload(path, model_id):
    """Read a :func:`save_payload` file (:func:`read_payload`); refused when trained on another model's features."""
    return read_payload(Path(path).read_bytes(), path, model_id)
