"""The router's embedder on a GPU share: what a BERT/XLM-R encoder takes (weights plus one batch's activations).

The router deployment is its own process on the GPU, so it pays its own CUDA context too. Counted per replica:
  weights      parameters (token, position and type embeddings; per layer q/k/v/o and the two MLP matrices
               with their biases and two LayerNorms; the pooler) x bytes per parameter (2 with use_fp16);
  activations  one batch of `batch_size` texts of `max_length` tokens through one layer at a time: the hidden
               state, q/k/v and the attention output (4 x hidden) plus the MLP's inner activation per token,
               and the attention scores and probabilities (2 x heads x max_length^2) per text;
  context      CUDA context and allocator slack (as for an engine, `memory.CONTEXT_BYTES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.plan.catalog import ENCODER_INDEX, short_name


@dataclass(frozen=True)
class EncoderShape:
    """The numbers of an encoder's config.json that decide memory."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int = 1

    @classmethod
    def from_hf_config(cls, cfg: dict) -> EncoderShape:
        return cls(
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            type_vocab_size=int(cfg.get("type_vocab_size", 1)),
        )

    def parameter_count(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h
        pooler = h * h + h
        return embeddings + self.num_hidden_layers * layer + pooler

    def activation_bytes(self, batch_size: int, max_length: int, act_bytes: int) -> int:
        tokens = batch_size * max_length
        per_layer = tokens * (4 * self.hidden_size + self.intermediate_size)
        scores = 2 * batch_size * self.num_attention_heads * max_length * max_length
        return (per_layer + scores) * act_bytes


def encoder_shape(kind: str, model_path: str | None) -> tuple[EncoderShape, str]:
    """The router embedder's shape and where it came from: the model directory's config.json when it is on this
    machine, else the published shape of its kind (`bge-m3`, `minilm`)."""
    if model_path:
        file = Path(model_path).expanduser() / "config.json"
        if file.is_file():
            return EncoderShape.from_hf_config(json.loads(file.read_text())), str(file)
    name = {"bge-m3": "bge-m3", "minilm": "all-minilm-l6-v2"}[kind]
    entry = ENCODER_INDEX[short_name(name)]
    return EncoderShape.from_hf_config(dict(entry.config)), f"{entry.repos[0]} (published config.json)"
