"""The BGE-M3 path: FlagEmbedding's BGEM3FlagModel loads a directory in BGE-M3's on-disk layout and embeds.

The model is a tiny random XLM-RoBERTa with a freshly trained Unigram tokenizer, generated here, so the test
runs offline in seconds; the layout (config.json, tokenizer, model.safetensors, colbert_linear.pt,
sparse_linear.pt) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from router.config import EmbedderConfig
from router.embed import build_embedder

HIDDEN = 32
CORPUS = [
    "extract the invoice number from this email",
    "prove that the sum of two odd numbers is even",
    "summarize the meeting notes in five bullet points",
    "analyze whether this contract clause is enforceable",
    "translate good morning into french",
] * 10


def make_tiny_bge_m3(path: Path, *, heads: bool = True) -> Path:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R ids 0..3 keep their meaning
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = XLMRobertaTokenizer(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        cls_token="<s>", sep_token="</s>", mask_token="<mask>",
    )
    tokenizer.save_pretrained(path)

    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    XLMRobertaModel(config).eval().save_pretrained(path)
    if heads:
        torch.save(torch.nn.Linear(HIDDEN, HIDDEN).state_dict(), path / "colbert_linear.pt")
        torch.save(torch.nn.Linear(HIDDEN, 1).state_dict(), path / "sparse_linear.pt")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_bge_m3(tmp_path_factory.mktemp("bge-m3"))


def test_layout_is_bge_m3s(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt"} <= names


def test_loads_and_embeds_like_flagembeddings_own_encode(model_dir):
    from FlagEmbedding import BGEM3FlagModel

    texts = ["extract the invoice number", "prove the sum is even", "a much longer text " * 12]
    embedder = build_embedder(EmbedderConfig(kind="bge-m3", model_path=str(model_dir), max_length=64))
    vectors = embedder.embed(texts)

    assert embedder.dim == HIDDEN and vectors.shape == (3, HIDDEN) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])

    # The reference: BGE-M3's own encode path (CLS pooling, normalized dense vectors).
    reference = BGEM3FlagModel(str(model_dir), use_fp16=False, devices="cpu", passage_max_length=64)
    expected = reference.encode(texts, max_length=64, return_dense=True)["dense_vecs"]
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_batches_split_and_reorder_consistently(model_dir):
    embedder = build_embedder(EmbedderConfig(kind="bge-m3", model_path=str(model_dir), batch_size=2))
    texts = ["short", "a medium length text here", "x " * 40, "analyze the clause", "hi"]
    together = embedder.embed(texts)
    alone = np.vstack([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_missing_heads_fail_instead_of_random_heads(tmp_path):
    path = make_tiny_bge_m3(tmp_path / "no-heads", heads=False)
    with pytest.raises(FileNotFoundError, match=r"lacks colbert_linear\.pt, sparse_linear\.pt.*random heads"):
        build_embedder(EmbedderConfig(kind="bge-m3", model_path=str(path)))


def test_missing_directory_is_not_treated_as_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; set router.embedder.model_path"):
        build_embedder(EmbedderConfig(kind="bge-m3", model_path="BAAI/bge-m3"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_embedder(EmbedderConfig(kind="minilm", model_path=str(tmp_path / "empty")))
