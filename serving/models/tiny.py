"""Tiny random-weight Llama models for tests and the CPU default, generated fully offline.

Each model gets a byte-level BPE tokenizer trained with `tokenizers` on text that ships with Python
(stdlib docstrings), a chat template, and random weights saved with `save_pretrained`. The output
is deterministic and idempotent: a directory that already holds a complete model is left alone.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email",
    "functools", "http.client", "inspect", "json", "logging", "pathlib", "re", "socket",
    "statistics", "string", "textwrap", "typing", "unittest", "urllib.parse", "zipfile",
)
_DONE_MARKER = "tierserve-tiny.json"


@dataclass(frozen=True)
class TinySpec:
    """Shape of one tiny model; `large` is a few times bigger than `small`, as a real pair is.

    head_dim (hidden_size / num_heads) must be one vLLM's CPU attention supports (>= 32).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seed: int


TINY_MODELS: tuple[TinySpec, ...] = (
    TinySpec("small", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=176, seed=1),
    TinySpec("large", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352, seed=2),
)
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048


def _corpus() -> list[str]:
    """Local English text: docstrings of stdlib modules and their public members."""
    with warnings.catch_warnings():  # touching deprecated aliases (typing.io) warns; only the text is read
        warnings.simplefilter("ignore", DeprecationWarning)
        return [doc for name in _CORPUS_MODULES for doc in _module_docs(name)]


def _module_docs(name: str) -> list[str]:
    module = importlib.import_module(name)
    docs = [module.__doc__] if module.__doc__ else []
    for attr in sorted(dir(module)):
        doc = getattr(getattr(module, attr, None), "__doc__", None)
        if isinstance(doc, str) and not attr.startswith("_"):
            docs.append(doc)
    return docs


def train_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer and save it in Hugging Face's layout."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = MAX_POSITIONS
    fast.save_pretrained(out_dir)


def _save_model(spec: TinySpec, out_dir: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
    )


def is_complete(model_dir: Path) -> bool:
    return (model_dir / _DONE_MARKER).is_file()


def generate_tiny_models(out_dir: str | Path, *, force: bool = False) -> dict[str, Path]:
    """Write `small` and `large` under out_dir; return {name: path}. Existing complete models are kept."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {spec.name: out / f"tiny-{spec.name}" for spec in TINY_MODELS}
    todo = [s for s in TINY_MODELS if force or not is_complete(paths[s.name])]
    if not todo:
        return paths
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        train_tokenizer(tokenizer_dir)
        for spec in todo:
            staging = Path(tmp) / spec.name
            _save_model(spec, staging, tokenizer_dir)
            (staging / _DONE_MARKER).write_text(json.dumps({"spec": spec.__dict__}))
            # Swap in atomically so a half-written model is never picked up by an engine.
            if paths[spec.name].exists():
                shutil.rmtree(paths[spec.name])
            staging.rename(paths[spec.name])
            logger.info("wrote tiny model %s", paths[spec.name])
    return paths
