"""Labelled routing data by name or path: `load_dataset("mmlu", data_dir)` or a CSV/JSONL file.

The frame's columns and the split are `router.eval.labelled`'s; the shared sets are read by
`router.eval.builtin`, any other file by `router.eval.tables`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pandas as pd

from router.eval.builtin import (
    ROUTERBENCH_FILES,
    load_gsm8k,
    load_mmlu,
    load_mt_bench,
    load_routerbench,
)
from router.eval.labelled import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    ConfidenceKind,
    LabelledSet,
    difficulty_label,
    hash_split,
)
from router.eval.tables import load_table

__all__ = ["BUILTIN", "CASCADE_BUILTIN", "ConfidenceKind", "LabelledSet", "default_data_dir", "difficulty_label",
           "hash_split", "load_dataset", "load_table", "split_overlap", "with_overlap_notice"]

BUILTIN = ("mmlu", "gsm8k", "mt-bench", "arc-challenge", "mbpp", "winogrande")
CASCADE_BUILTIN = {"plaut-msp": "cascades/plaut-msp/llama3_8b_to_70b.jsonl"}
"""Labelled sets that carry the weak model's confidence (for cascades), by name → path under the data dir."""


def default_data_dir() -> Path:
    """`$TIERSERVE_EVAL_DATA`, else `<repo root>/../shared/data` (the shared data beside the checkout)."""
    env = os.environ.get("TIERSERVE_EVAL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def split_overlap(frame: pd.DataFrame) -> int:
    """Distinct prompts that appear in both the train and the test split."""
    train = set(frame.loc[frame["split"] == "train", "prompt"])
    return len(train & set(frame.loc[frame["split"] == "test", "prompt"]))


def load_dataset(
    name_or_path: str,
    data_dir: Path,
    *,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    **table_options,
) -> LabelledSet:
    """A built-in dataset by name (see BUILTIN), or a CSV/JSONL path read by `load_table`."""
    split = {"test_fraction": test_fraction, "seed": seed}
    if name_or_path == "mmlu":
        return with_overlap_notice(load_mmlu(data_dir, **split))
    if name_or_path == "gsm8k":
        return with_overlap_notice(load_gsm8k(data_dir, **split))
    if name_or_path == "mt-bench":
        return with_overlap_notice(load_mt_bench(data_dir, **split))
    if name_or_path in ROUTERBENCH_FILES:
        models = {k: v for k, v in table_options.items() if k in ("strong_model", "weak_model") and v}
        return with_overlap_notice(load_routerbench(data_dir, name_or_path, **models))
    options = {k: v for k, v in table_options.items() if k not in ("strong_model", "weak_model")}
    if name_or_path in CASCADE_BUILTIN:
        options.update(weak_confidence_col=options.get("weak_confidence_col") or "weak_confidence",
                       weak_confidence_kind=options.get("weak_confidence_kind") or "prob", split_col="split")
        ds = load_table(Path(data_dir) / CASCADE_BUILTIN[name_or_path], **split, **options)
        return with_overlap_notice(replace(ds, name=name_or_path, notices=()))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {name_or_path!r}: not one of {', '.join(BUILTIN + tuple(CASCADE_BUILTIN))}"
                                " and not a file")
    return with_overlap_notice(load_table(path, **split, **options))


def with_overlap_notice(ds: LabelledSet) -> LabelledSet:
    """Add a notice when prompts appear in both splits (a learned router then sees test prompts in train)."""
    both = split_overlap(ds.frame)
    if not both:
        return ds
    note = (f"{both} distinct prompts appear in both train and test; learned routers have seen those test "
            "prompts (dedupe the file or split by prompt)")
    return replace(ds, notices=(*ds.notices, note))
