"""image_similarity: find similar images with a fine-tuned CNN and learned distances.

The numbered scripts at the repository root drive this package step by step; see the README.
"""
import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that ``import image_similarity`` stays light (no torch, no FAISS).
_LAZY = {"create": "apps.similarity_model", "load": "apps.similarity_model", "SimilarityModel": "apps.similarity_model",
         "open_run": "apps.similarity_model",
         "combine": "apps.attributes", "AttributeModel": "apps.attributes", "CombinedSimilarity": "apps.attributes"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
