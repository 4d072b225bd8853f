"""Text embedders for the router: the interface, FlagEmbedding's encoders, checked ONNX copies, and the factory."""

from router.embed.base import Embedder, RecheckEmbedder, near_boundary
from router.embed.build import build_embedder, default_embedder, embedder_dim
from router.embed.flag import FlagEmbedder

__all__ = ["Embedder", "FlagEmbedder", "RecheckEmbedder", "build_embedder", "default_embedder", "embedder_dim",
           "near_boundary"]
