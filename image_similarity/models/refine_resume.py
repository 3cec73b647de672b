"""Step 2's resume checkpoints: everything an interrupted refinement needs to continue bit for bit.

After every epoch :func:`save_resume_checkpoint` writes, atomically, the weights, the optimizer and scaler states,
the best-so-far weights, the log rows and every global random state, tagged with the settings and a signature of
the data; :func:`load_resume_checkpoint` refuses a checkpoint of other settings or other images.
"""
import hashlib
import random

import numpy as np
import torch

from ..data.fileio import atomic_path

__all__ = ["RESUME_FORMAT", "RESUMABLE_CHANGES", "rng_states", "restore_rng_states", "data_signature",
           "save_resume_checkpoint", "load_resume_checkpoint"]

RESUME_FORMAT = "image_similarity.refine_resume/1"
# Settings that may differ between an interrupted run and its resumption: more epochs extend a finished run.
RESUMABLE_CHANGES = ("max_epochs", "n_workers", "cpu_bf16", "activation_checkpointing")


def rng_states():
    """Every global random state (torch, CUDA, numpy, Python), as values a ``weights_only`` archive can hold."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's state as plain values and a tensor, so the checkpoint loads with weights_only=True
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate()}


def restore_rng_states(states):
    """Set the global random states saved by :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


def data_signature(classes, train_items, val_items):
    """SHA-256 of the classes and the split's keys: a resume must see the same data."""
    digest = hashlib.sha256()
    for part in (classes, train_items, val_items):
        digest.update(repr(list(part)).encode("utf-8"))
    return digest.hexdigest()


def load_resume_checkpoint(path, config, signature):
    """The state saved by an earlier run of the same configuration on the same data.

    Raises
    ------
    ValueError
        When ``path`` is not a resume checkpoint, or was made with other settings or other images (names them).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... for broken files
        raise ValueError(f"{path}: not a readable resume checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path}: not a refinement resume checkpoint (no {RESUME_FORMAT!r} format tag)")
    now, then = config.as_dict(), state["config"]
    changed = [f"{k} {then.get(k)!r} -> {now[k]!r}" for k in now
               if k not in RESUMABLE_CHANGES and then.get(k) != now[k]]
    if changed:
        raise ValueError(f"{path} was made with other settings ({'; '.join(changed)}): run without --resume to "
                         "start over")
    if state["data_signature"] != signature:
        raise ValueError(f"{path} was made on other images or labels: run without --resume to start over")
    return state



def save_resume_checkpoint(path, epoch, config, signature, model, optimizer, scaler, best, log_rows):
    """Write the state after 1-based ``epoch`` atomically (with the global random states, read now).

    Parameters
    ----------
    config : refine_config.RefineConfig
    signature : str
        :func:`data_signature` of the run's data.
    model, optimizer, scaler
        Their ``state_dict()`` is saved.
    best : dict
        The best epoch so far: ``epoch``, ``val_err``, ``val_loss``, ``state_dict`` (on CPU).
    log_rows : list of dict
        One per epoch so far.
    """
    payload = {"format": RESUME_FORMAT, "epoch": epoch, "config": config.as_dict(), "data_signature": signature,
               "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
               "best": best, "log_rows": log_rows, "rng": rng_states()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
