"""Refined or pretrained: step 2 ranks the validation ranking sets by cosine distance with both embeddings, so that
steps 3+ can keep the pretrained network when it ranks better (``rf_fallbackToPretrained``).
"""
from pathlib import Path

import numpy as np

from . import backbones
from .embedder import Network

__all__ = ["validation_ranking", "compare_on_validation", "pretrained_ranks_better"]


def validation_ranking(network, img_dir, ranking_sets, batch_size=32, n_workers=0, skipped=None):
    """How well ``network``'s cosine distance ranks ``ranking_sets``.

    Parameters
    ----------
    network : embedder.Network
    img_dir : str or Path
        Folder the ranking sets' keys are relative to.
    ranking_sets : list of splits.RankingSet
        The validation ranking sets (never the test split).

    Returns
    -------
    dict
        ``{'top1': fraction in [0, 1], 'mean_rank': float, 'n_sets': int}``. An embedding with NaN or infinite
        values (a diverged network) gets top-1 0 and the worst mean rank.
    """
    from ..pipeline.evaluation import mean_rank, rank_ranking_sets, top_k_accuracy  # above models/: imported late
    from ..data.features import Features
    from ..search.rankers import CosineRanker

    keys = sorted({k for s in ranking_sets for k in (s.query, *s.references)})
    found, matrix = network.embed_files([Path(img_dir) / k for k in keys], img_dir, batch_size, n_workers, skipped)
    sets = [s for s in ranking_sets if {s.query, *s.references} <= set(found)]  # unreadable images drop their sets
    if not sets:
        raise ValueError(f"no validation ranking set has all its images readable under {img_dir}")
    if not np.isfinite(matrix).all():
        return {"top1": 0.0, "mean_rank": float(max(len(s.references) for s in sets)), "n_sets": len(sets)}
    ranks = rank_ranking_sets(CosineRanker(), Features(found, matrix, {}), sets)
    return {"top1": top_k_accuracy(ranks, 1), "mean_rank": mean_rank(ranks), "n_sets": len(sets)}


def compare_on_validation(model, backbone, data_config, img_dir, ranking_sets, device=None, batch_size=32,
                          n_workers=0, skipped=None):
    """:func:`validation_ranking` of the refined ``model``'s embedding and of the pretrained ``backbone``'s.

    Parameters
    ----------
    model : heads.ImageClassifier
        The refined network.
    backbone : str
        Registry name of its backbone.
    data_config : backbones.DataConfig
        What ``model`` was trained with. The pretrained network runs at its entry's own data config, as step 3
        would run it without refinement.

    Returns
    -------
    dict
        ``{'refined': {...}, 'pretrained': {...}}``, each as :func:`validation_ranking`.
    """
    refined = Network(model.embedding_net(), data_config, dim=model.embedding_dim, device=device)
    pretrained = Network(backbones.create_model(backbone), backbones.get_backbone(backbone).data_config(),
                         device=device)
    return {name: validation_ranking(net, img_dir, ranking_sets, batch_size, n_workers, skipped)
            for name, net in (("refined", refined), ("pretrained", pretrained))}


def pretrained_ranks_better(comparison):
    """Whether the pretrained network ranks the validation sets strictly better: higher top-1, then lower mean rank
    (the order 5_evaluate.py chooses rankers by)."""
    refined, pretrained = comparison["refined"], comparison["pretrained"]
    return (-pretrained["top1"], pretrained["mean_rank"]) < (-refined["top1"], refined["mean_rank"])
