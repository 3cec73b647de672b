"""Classification heads on a backbone: :class:`ImageClassifier` (what step 2 trains) and its retrieval part.

The head is the tutorial's linear layer or a normalised-softmax cosine classifier (:class:`NormSoftmaxHead`);
:meth:`ImageClassifier.embedding_net` gives the network whose outputs retrieval compares.
"""
import torch
from torch import nn

__all__ = ["HEADS", "NormSoftmaxHead", "EmbeddingNet", "ImageClassifier"]

HEADS = ("linear", "normsoftmax")


class NormSoftmaxHead(nn.Module):
    """A cosine classifier: logits = cos(embedding, class weight) / temperature (Zhai & Wu 2018, "normalised softmax").

    Both the embedding (optionally projected to ``embedding_dim`` first) and every class weight are L2-normalised,
    so training pulls each image's embedding towards its label's direction: cosine distance is what the loss shapes.

    Parameters
    ----------
    in_dim : int
        Length of the backbone's features.
    n_classes : int
    temperature : float
        > 0; small values sharpen the softmax (0.05 in the paper).
    embedding_dim : int
        A bias-free linear projection to this many dims before normalising; 0 = none.
    """

    def __init__(self, in_dim, n_classes, temperature=0.05, embedding_dim=0):
        super().__init__()
        self.temperature = float(temperature)
        self.projection = nn.Linear(in_dim, embedding_dim, bias=False) if embedding_dim else nn.Identity()
        self.dim = embedding_dim or in_dim
        self.weight = nn.Parameter(torch.empty(n_classes, self.dim))
        nn.init.normal_(self.weight, std=0.01)

    def embed(self, features):
        """(N, in_dim) backbone features -> (N, dim) L2-normalised embeddings."""
        return nn.functional.normalize(self.projection(features), dim=1)

    def forward(self, features):
        """(N, in_dim) -> logits (N, n_classes)."""
        return self.embed(features) @ nn.functional.normalize(self.weight, dim=1).T / self.temperature


class EmbeddingNet(nn.Module):
    """The retrieval part of an :class:`ImageClassifier`: images -> (N, num_features) embeddings."""

    def __init__(self, backbone, embed, num_features):
        super().__init__()
        self.backbone, self.embed, self.num_features = backbone, embed, num_features

    def forward(self, x):
        return self.embed(self.backbone(x))


class ImageClassifier(nn.Module):
    """A backbone with a dropout + classification head, trained by 2_refineDNN.py.

    Parameters
    ----------
    backbone : nn.Module
        Returns ``(N, D)`` pooled features and has ``num_features == D``.
    n_classes : int
    dropout : float
        Dropout probability before the head (0 = none).
    head : {'linear', 'normsoftmax'}
        The tutorial's linear layer (the embedding is the backbone's features), or :class:`NormSoftmaxHead` (the
        embedding is its L2-normalised, optionally projected, features).
    temperature, embedding_dim
        Of :class:`NormSoftmaxHead`; ignored by the linear head.
    """

    def __init__(self, backbone, n_classes, dropout=0.5, head="linear", temperature=0.05, embedding_dim=0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head = {head!r}: must be one of {', '.join(HEADS)}")
        self.backbone, self.n_classes, self.head_kind = backbone, int(n_classes), head
        self.head_params = {"temperature": float(temperature), "embedding_dim": int(embedding_dim)}
        classifier = (nn.Linear(backbone.num_features, n_classes) if head == "linear" else
                      NormSoftmaxHead(backbone.num_features, n_classes, temperature, embedding_dim))
        self.head = nn.Sequential(nn.Dropout(dropout), classifier)

    @property
    def embedding_dim(self):
        """Length of :meth:`embed`'s vectors."""
        return self.head[1].dim if self.head_kind == "normsoftmax" else self.backbone.num_features

    def forward(self, x):
        """(N, 3, H, W) float32 -> logits (N, n_classes)."""
        return self.head(self.backbone(x))

    def embed(self, x):
        """(N, 3, H, W) float32 -> embeddings (N, embedding_dim): what retrieval compares."""
        return self.embedding_net()(x)

    def embedding_net(self):
        """An :class:`EmbeddingNet` sharing this model's weights (the backbone, and the normalised head's part)."""
        embed = self.head[1].embed if self.head_kind == "normsoftmax" else nn.Identity()
        return EmbeddingNet(self.backbone, embed, self.embedding_dim)
