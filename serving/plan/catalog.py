"""Published shapes of common open models, so `tierserve plan` works before the weights are downloaded.

Each entry is the part of the model's published config.json that decides memory, copied from the Hugging Face
repos named (instruct and base checkpoints share a shape). A tier whose model directory holds a config.json is
planned from that file; otherwise its model name (`--model small=qwen2.5-7b`, or the directory's name such as
/models/Qwen2.5-32B-Instruct-AWQ) is looked up here. tests/unit/test_plan_catalog.py checks every entry against
the parameter count its model card publishes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from serving.plan.shape import ModelShape, load_shape


@dataclass(frozen=True)
class Published:
    """One shape and the Hugging Face repos that publish it."""

    repos: tuple[str, ...]
    config: Mapping[str, object]


def _qwen(layers: int, hidden: int, heads: int, kv: int, inter: int, *, tied: bool = False) -> dict:
    return {"model_type": "qwen2", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": 151936 if tied else 152064,
            "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "max_position_embeddings": 32768}


def _llama(layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, dtype: str, context: int,
           **extra: object) -> dict:
    return {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": False,
            "torch_dtype": dtype, "max_position_embeddings": context, **extra}


def _mistral(layers: int, hidden: int, inter: int, vocab: int, context: int, **extra: object) -> dict:
    return {"model_type": "mistral", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": 32,
            "num_key_value_heads": 8, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "max_position_embeddings": context, **extra}


_AWQ = {"torch_dtype": "float16",
        "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm",
                                "zero_point": True}}
"""Qwen's own AWQ checkpoints: 4-bit weights, fp16 scales and packed zeros per group of 128, fp16 elsewhere."""

_QWEN_7B, _QWEN_14B, _QWEN_32B = _qwen(28, 3584, 28, 4, 18944), _qwen(48, 5120, 40, 8, 13824), _qwen(64, 5120, 40, 8, 27648)
_LLAMA3_8B = _llama(32, 4096, 32, 8, 14336, 128256, "bfloat16", 131072)
_LLAMA3_70B = _llama(80, 8192, 64, 8, 28672, 128256, "bfloat16", 131072)

DECODERS: tuple[Published, ...] = (
    Published(("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"), _qwen(24, 896, 14, 2, 4864, tied=True)),
    Published(("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"), _qwen(28, 1536, 12, 2, 8960, tied=True)),
    Published(("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"), _qwen(36, 2048, 16, 2, 11008, tied=True)),
    Published(("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"), _QWEN_7B),
    Published(("Qwen/Qwen2.5-7B-Instruct-AWQ",), {**_QWEN_7B, **_AWQ}),
    Published(("Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"), _QWEN_14B),
    Published(("Qwen/Qwen2.5-14B-Instruct-AWQ",), {**_QWEN_14B, **_AWQ}),
    Published(("Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct"), _QWEN_32B),
    Published(("Qwen/Qwen2.5-32B-Instruct-AWQ",), {**_QWEN_32B, **_AWQ}),
    Published(("Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"), _qwen(80, 8192, 64, 8, 29568)),
    Published(("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"), _LLAMA3_8B),
    Published(("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"),
              {**_LLAMA3_8B, "max_position_embeddings": 8192}),
    Published(("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"),
              _LLAMA3_70B),
    Published(("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct"),
              {**_LLAMA3_70B, "max_position_embeddings": 8192}),
    Published(("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
              {**_llama(16, 2048, 32, 8, 8192, 128256, "bfloat16", 131072), "head_dim": 64,
               "tie_word_embeddings": True}),
    Published(("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
              {**_llama(28, 3072, 24, 8, 8192, 128256, "bfloat16", 131072), "head_dim": 128,
               "tie_word_embeddings": True}),
    Published(("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
              _llama(32, 4096, 32, 32, 11008, 32000, "float16", 4096)),
    Published(("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"),
              _llama(40, 5120, 40, 40, 13824, 32000, "float16", 4096)),
    Published(("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf"),
              _llama(80, 8192, 64, 8, 28672, 32000, "float16", 4096)),
    Published(("codellama/CodeLlama-7b-hf", "codellama/CodeLlama-7b-Instruct-hf"),
              _llama(32, 4096, 32, 32, 11008, 32016, "bfloat16", 16384)),
    Published(("codellama/CodeLlama-13b-hf", "codellama/CodeLlama-13b-Instruct-hf"),
              _llama(40, 5120, 40, 40, 13824, 32016, "bfloat16", 16384)),
    Published(("codellama/CodeLlama-34b-hf", "codellama/CodeLlama-34b-Instruct-hf"),
              _llama(48, 8192, 64, 8, 22016, 32000, "bfloat16", 16384)),
    Published(("codellama/CodeLlama-70b-hf", "codellama/CodeLlama-70b-Instruct-hf"),
              _llama(80, 8192, 64, 8, 28672, 32016, "bfloat16", 16384)),
    Published(("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"),
              _mistral(32, 4096, 14336, 32000, 32768)),
    Published(("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"), _mistral(32, 4096, 14336, 32768, 32768)),
    Published(("mistralai/Mistral-Nemo-Base-2407", "mistralai/Mistral-Nemo-Instruct-2407"),
              _mistral(40, 5120, 14336, 131072, 1024000, head_dim=128)),
    Published(("mistralai/Mistral-Small-24B-Base-2501", "mistralai/Mistral-Small-24B-Instruct-2501"),
              _mistral(40, 5120, 32768, 131072, 32768, head_dim=128)),
)
"""Decoder LLMs a tier may serve."""

ENCODERS: tuple[Published, ...] = (
    Published(("BAAI/bge-m3",), {"model_type": "xlm-roberta", "num_hidden_layers": 24, "hidden_size": 1024,
                                 "num_attention_heads": 16, "intermediate_size": 4096, "vocab_size": 250002,
                                 "max_position_embeddings": 8194, "type_vocab_size": 1}),
    Published(("sentence-transformers/all-MiniLM-L6-v2",),
              {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12,
               "intermediate_size": 1536, "vocab_size": 30522, "max_position_embeddings": 512,
               "type_vocab_size": 2}),
)
"""Embedding models the router may run (router.embedder.kind bge-m3 / minilm)."""


def short_name(name: str) -> str:
    """The lookup key of a model name, repo id or directory: lowercase, without the organization, a `Meta-`
    prefix or `-Instruct`/`-chat`/`-hf` (instruct and base checkpoints share a shape):
    /models/Qwen2.5-32B-Instruct-AWQ -> qwen2.5-32b-awq, meta-llama/Meta-Llama-3-8B-Instruct -> llama-3-8b."""
    key = str(name).rstrip("/").rsplit("/", 1)[-1].lower()
    key = re.sub(r"^meta-(?=llama)", "", key)
    return re.sub(r"-(instruct|chat|hf|base)(?=-|$)", "", key)


def _index(entries: tuple[Published, ...]) -> Mapping[str, Published]:
    index = {}
    for entry in entries:
        for repo in entry.repos:
            index[short_name(repo)] = entry
    return MappingProxyType(index)


DECODER_INDEX = _index(DECODERS)
ENCODER_INDEX = _index(ENCODERS)


def find_decoder(name: str) -> Published | None:
    """The published shape for a model name, repo id or directory name; None when the catalog lacks it."""
    return DECODER_INDEX.get(short_name(name))


def known_decoders() -> list[str]:
    return sorted(DECODER_INDEX)


def resolve_shape(model: str) -> tuple[ModelShape, str]:
    """A tier's shape and where it came from: the config.json at `model` (a directory or the file) when it is
    on this machine, else the published shape of the model it names (a catalog name, repo id or a directory
    named like the repo, e.g. /models/Qwen2.5-7B-Instruct)."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file() or (path.is_file() and path.name.endswith(".json")):
        return load_shape(path), str(path / "config.json" if path.is_dir() else path)
    entry = find_decoder(model)
    if entry is None:
        raise FileNotFoundError(
            f"{model}: no config.json there, and no published shape by that name. Point the tier's model (or "
            f"--model TIER=PATH) at a model directory, or name a known model: {', '.join(known_decoders())}."
        )
    where = "" if short_name(model) == str(model).lower() else f"; {model} is not on this machine"
    return ModelShape.from_hf_config(dict(entry.config), entry.repos[-1]), f"{entry.repos[-1]} (published config.json{where})"
