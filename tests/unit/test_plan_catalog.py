"""The planner's published model shapes against the models' published config.json values and model-card sizes,
and the lookups an operator types (`--model large=qwen2.5-32b-awq`, /models/Qwen2.5-7B-Instruct)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.plan.catalog import DECODERS, ENCODERS, find_decoder, resolve_shape
from serving.plan.embedder import EncoderShape, encoder_shape
from serving.plan.shape import ModelShape

REPO = Path(__file__).resolve().parents[2]

# repo: (num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
#        tie_word_embeddings, head_dim), as each repo's config.json publishes them (head_dim: None where the file
#        leaves it to hidden_size / heads).
PUBLISHED_CONFIG = {
    "Qwen/Qwen2.5-0.5B-Instruct": (24, 896, 14, 2, 4864, 151936, True, None),
    "Qwen/Qwen2.5-1.5B-Instruct": (28, 1536, 12, 2, 8960, 151936, True, None),
    "Qwen/Qwen2.5-3B-Instruct": (36, 2048, 16, 2, 11008, 151936, True, None),
    "Qwen/Qwen2.5-7B-Instruct": (28, 3584, 28, 4, 18944, 152064, False, None),
    "Qwen/Qwen2.5-7B-Instruct-AWQ": (28, 3584, 28, 4, 18944, 152064, False, None),
    "Qwen/Qwen2.5-14B-Instruct": (48, 5120, 40, 8, 13824, 152064, False, None),
    "Qwen/Qwen2.5-14B-Instruct-AWQ": (48, 5120, 40, 8, 13824, 152064, False, None),
    "Qwen/Qwen2.5-32B-Instruct": (64, 5120, 40, 8, 27648, 152064, False, None),
    "Qwen/Qwen2.5-32B-Instruct-AWQ": (64, 5120, 40, 8, 27648, 152064, False, None),
    "Qwen/Qwen2.5-72B-Instruct": (80, 8192, 64, 8, 29568, 152064, False, None),
    "meta-llama/Llama-3.1-8B-Instruct": (32, 4096, 32, 8, 14336, 128256, False, None),
    "meta-llama/Meta-Llama-3-8B-Instruct": (32, 4096, 32, 8, 14336, 128256, False, None),
    "meta-llama/Meta-Llama-3-70B-Instruct": (80, 8192, 64, 8, 28672, 128256, False, None),
    "meta-llama/Llama-3.1-70B-Instruct": (80, 8192, 64, 8, 28672, 128256, False, None),
    "meta-llama/Llama-3.3-70B-Instruct": (80, 8192, 64, 8, 28672, 128256, False, None),
    "meta-llama/Llama-3.2-1B-Instruct": (16, 2048, 32, 8, 8192, 128256, True, 64),
    "meta-llama/Llama-3.2-3B-Instruct": (28, 3072, 24, 8, 8192, 128256, True, 128),
    "meta-llama/Llama-2-7b-hf": (32, 4096, 32, 32, 11008, 32000, False, None),
    "meta-llama/Llama-2-13b-hf": (40, 5120, 40, 40, 13824, 32000, False, None),
    "meta-llama/Llama-2-70b-hf": (80, 8192, 64, 8, 28672, 32000, False, None),
    "codellama/CodeLlama-7b-Instruct-hf": (32, 4096, 32, 32, 11008, 32016, False, None),
    "codellama/CodeLlama-13b-Instruct-hf": (40, 5120, 40, 40, 13824, 32016, False, None),
    "codellama/CodeLlama-34b-Instruct-hf": (48, 8192, 64, 8, 22016, 32000, False, None),
    "codellama/CodeLlama-70b-Instruct-hf": (80, 8192, 64, 8, 28672, 32016, False, None),
    "mistralai/Mistral-7B-Instruct-v0.2": (32, 4096, 32, 8, 14336, 32000, False, None),
    "mistralai/Mistral-7B-Instruct-v0.3": (32, 4096, 32, 8, 14336, 32768, False, None),
    "mistralai/Mistral-Nemo-Instruct-2407": (40, 5120, 32, 8, 14336, 131072, False, 128),
    "mistralai/Mistral-Small-24B-Instruct-2501": (40, 5120, 32, 8, 32768, 131072, False, 128),
}
# Sizes the model cards publish (billions of parameters); AWQ checkpoints count their unquantized parameters.
PUBLISHED_SIZE = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49, "Qwen/Qwen2.5-1.5B-Instruct": 1.54, "Qwen/Qwen2.5-3B-Instruct": 3.09,
    "Qwen/Qwen2.5-7B-Instruct": 7.61, "Qwen/Qwen2.5-14B-Instruct": 14.7, "Qwen/Qwen2.5-32B-Instruct": 32.5,
    "Qwen/Qwen2.5-72B-Instruct": 72.7, "meta-llama/Llama-3.1-8B-Instruct": 8.03,
    "meta-llama/Llama-3.1-70B-Instruct": 70.6, "meta-llama/Llama-3.2-1B-Instruct": 1.24,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21, "meta-llama/Llama-2-7b-hf": 6.74, "meta-llama/Llama-2-13b-hf": 13.0,
    "meta-llama/Llama-2-70b-hf": 69.0, "codellama/CodeLlama-34b-Instruct-hf": 33.7,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25, "mistralai/Mistral-Nemo-Instruct-2407": 12.2,
    "mistralai/Mistral-Small-24B-Instruct-2501": 23.6,
}  # fmt: skip
AWQ = {"Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen/Qwen2.5-14B-Instruct-AWQ", "Qwen/Qwen2.5-32B-Instruct-AWQ"}


def _entry(repo: str):
    (entry,) = [e for e in DECODERS if repo in e.repos]
    return entry


@pytest.mark.parametrize("repo", list(PUBLISHED_CONFIG))
def test_shape_is_the_published_config(repo: str) -> None:
    layers, hidden, heads, kv, inter, vocab, tied, head_dim = PUBLISHED_CONFIG[repo]
    shape = ModelShape.from_hf_config(dict(_entry(repo).config))
    assert (shape.num_hidden_layers, shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
            shape.intermediate_size, shape.vocab_size, shape.tie_word_embeddings) == (
        layers, hidden, heads, kv, inter, vocab, tied)  # fmt: skip
    assert shape.head_dim == (head_dim or hidden // heads)
    if repo in AWQ:
        assert shape.quantization is not None and (shape.quantization.bits, shape.quantization.group_size) == (4, 128)
        assert shape.torch_dtype == "float16"
    else:
        assert shape.quantization is None


@pytest.mark.parametrize("repo", list(PUBLISHED_SIZE))
def test_parameter_count_is_the_model_cards(repo: str) -> None:
    shape = ModelShape.from_hf_config(dict(_entry(repo).config))
    assert shape.parameter_count() / 1e9 == pytest.approx(PUBLISHED_SIZE[repo], rel=0.015)


def test_every_catalog_entry_is_checked() -> None:
    unchecked = [entry.repos for entry in DECODERS if not set(entry.repos) & set(PUBLISHED_CONFIG)]
    assert not unchecked, f"catalog shapes no test compares with their config.json: {unchecked}"


@pytest.mark.parametrize(
    ("typed", "repo"),
    [
        ("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct"),
        ("qwen2.5-32b-awq", "Qwen/Qwen2.5-32B-Instruct-AWQ"),
        ("/models/Qwen2.5-32B-Instruct-AWQ", "Qwen/Qwen2.5-32B-Instruct-AWQ"),
        ("Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B-Instruct"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct"),
        ("/models/CodeLlama-34b-Instruct-hf", "codellama/CodeLlama-34b-Instruct-hf"),
        ("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    ],
)
def test_names_an_operator_types_resolve(typed: str, repo: str) -> None:
    entry = find_decoder(typed)
    assert entry is not None and repo in entry.repos


def test_every_model_the_docs_mention_is_known() -> None:
    docs = [REPO / "README.md", REPO / "helm" / "README.md", *sorted((REPO / "deploy").glob("*.yaml"))]
    text = "\n".join(path.read_text() for path in docs)
    named = set(re.findall(r"\b((?:Qwen2\.5|Llama-[23](?:\.\d)?|Meta-Llama-3(?:\.\d)?|Mistral|CodeLlama)-[\w.-]*\d+[bB][\w.-]*)", text))
    assert {"Qwen2.5-7B-Instruct", "Qwen2.5-32B-Instruct-AWQ", "CodeLlama-34b"} <= named
    unknown = sorted(name for name in named if find_decoder(name.rstrip(".")) is None)
    assert not unknown, f"models the docs name that `tierserve plan` cannot plan without their weights: {unknown}"


def test_a_local_config_json_wins_and_an_unknown_name_is_refused(tmp_path: Path) -> None:
    import json

    local = tmp_path / "Qwen2.5-7B-Instruct"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({**_entry("Qwen/Qwen2.5-7B-Instruct").config, "num_hidden_layers": 2}))
    shape, source = resolve_shape(str(local))
    assert shape.num_hidden_layers == 2 and source == str(local / "config.json")
    with pytest.raises(FileNotFoundError, match="no published shape by that name.*qwen2.5-32b-awq"):
        resolve_shape("/models/my-finetune")


def test_bge_m3_is_xlm_r_large() -> None:
    (entry,) = [e for e in ENCODERS if "BAAI/bge-m3" in e.repos]
    shape = EncoderShape.from_hf_config(dict(entry.config))
    assert shape.parameter_count() / 1e6 == pytest.approx(568, rel=0.01)  # BAAI/bge-m3's model card: 568M
    minilm, _ = encoder_shape("minilm", None)
    assert minilm.parameter_count() / 1e6 == pytest.approx(22.7, rel=0.01)  # all-MiniLM-L6-v2: 22.7M


def test_a_local_encoder_config_is_read(tmp_path: Path) -> None:
    from tests.integration.test_bge_m3 import make_tiny_bge_m3

    path = make_tiny_bge_m3(tmp_path / "bge")
    shape, source = encoder_shape("bge-m3", str(path))
    from transformers import XLMRobertaModel

    model = XLMRobertaModel.from_pretrained(path)
    assert shape.parameter_count() == sum(p.numel() for p in model.parameters())
    assert source.endswith("config.json")
