"""A model's shape from its Hugging Face config.json: parameter count, weight bytes, KV bytes per token.

Llama-style decoders (Llama, Mistral, Qwen2, CodeLlama...): per layer q/k/v/o projections (grouped-query
attention: k and v have num_key_value_heads heads), a gated MLP (gate, up, down), two RMSNorms; then a final
norm, the token embedding and an lm_head unless tied to the embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "fp8": 1}
SCALE_BYTES = 2
"""Group scales of AWQ/GPTQ checkpoints are fp16."""
_QKV_BIAS_MODELS = {"qwen2"}
"""Model types whose q/k/v projections carry a bias even though config.json does not say so."""


def dtype_bytes(name: str) -> int:
    """Bytes per element of a torch dtype name ("bfloat16", "torch.float16", ...)."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r} is not known; use one of {sorted(DTYPE_BYTES)}.")
    return DTYPE_BYTES[key]


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the linear layers: `bits` per weight plus one scale (and zero) per group."""

    method: str
    bits: int
    group_size: int = -1
    """Input elements per scale; -1 means one scale per output channel (negligible)."""
    zero_point: bool = False

    def bytes_per_linear_param(self) -> float:
        per_group = SCALE_BYTES + (self.bits / 8 if self.zero_point else 0)
        return self.bits / 8 + (per_group / self.group_size if self.group_size > 0 else 0)


def quantization_from_config(qc: dict) -> Quantization:
    """Read a `quantization_config` block (AWQ, GPTQ, FP8, bitsandbytes)."""
    method = str(qc.get("quant_method", "")).lower()
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        # GPTQ always stores packed zeros; AWQ only with zero_point (its default).
        zero = method.startswith("gptq") or bool(qc.get("zero_point", True))
        return Quantization(method, bits, group, zero)
    if method == "fp8":
        return Quantization(method, 8)
    if method == "bitsandbytes":
        if qc.get("load_in_4bit"):
            return Quantization(method, 4, int(qc.get("bnb_4bit_blocksize", 64)))
        return Quantization(method, 8)
    raise ValueError(
        f"quantization_config.quant_method {method!r} is not supported by the planner; "
        "supported: awq, gptq, fp8, bitsandbytes."
    )


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a config.json that decide memory."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    torch_dtype: str = "bfloat16"
    quantization: Quantization | None = None
    max_position_embeddings: int | None = None
    """The longest context the model was trained for (None: not stated)."""

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelShape:
        """Build from a parsed config.json; a missing field is named with the file."""
        cfg = {**cfg.get("text_config", {}), **cfg} if "text_config" in cfg else cfg
        if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise ValueError(f"{source}: mixture-of-experts models are not supported by the planner.")
        missing = [
            k
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}; is this a decoder LLM's config.json?")
        heads = int(cfg["num_attention_heads"])
        qc = cfg.get("quantization_config")
        return cls(
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") in _QKV_BIAS_MODELS)),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            quantization=quantization_from_config(qc) if qc else None,
            max_position_embeddings=int(cfg["max_position_embeddings"]) if cfg.get("max_position_embeddings") else None,
        )

    def _linear_params_per_layer(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    def _other_params(self) -> int:
        """Embeddings, lm_head, norms and q/k/v biases: kept in 16 bits by weight-only quantization."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = 2 * self.hidden_size + ((q + 2 * kv) if self.attention_bias else 0)
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + self.hidden_size + embeddings

    def parameter_count(self) -> int:
        return self.num_hidden_layers * self._linear_params_per_layer() + self._other_params()

    def weight_bytes(self, act_bytes: int) -> int:
        """Bytes of all weights: linear layers at the quantized size, the rest at the engine dtype."""
        linear = self.num_hidden_layers * self._linear_params_per_layer()
        per_linear = self.quantization.bytes_per_linear_param() if self.quantization else act_bytes
        return round(linear * per_linear) + self._other_params() * act_bytes

    def kv_bytes_per_token(self, kv_dtype_bytes: int, tensor_parallel_size: int = 1) -> int:
        """K and V of every layer for one token on one GPU; vLLM replicates KV heads when TP exceeds them."""
        heads = max(1, self.num_key_value_heads // tensor_parallel_size)
        return 2 * self.num_hidden_layers * heads * self.head_dim * kv_dtype_bytes


def load_shape(path: str | Path) -> ModelShape:
    """Read a model directory's config.json (or a config.json path)."""
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no config.json; point the tier's model (or --model TIER=PATH) at a model directory."
        )
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from None
    return ModelShape.from_hf_config(cfg, str(file))
