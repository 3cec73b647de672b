"""image_similarity: find similar images with a fine-tuned CNN and learned distances.

The numbered scripts at the repository root drive this package step by step; see the README.
"""
import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that ``import image_similarity`` stays light (no torch, no FAISS).
_LAZY = {"create": "similarity_model", "load": "similarity_model", "SimilarityModel": "similarity_model",
         "combine": "attributes", "AttributeModel": "attributes", "CombinedSimilarity": "attributes"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
