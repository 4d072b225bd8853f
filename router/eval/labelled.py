"""One labelled routing set: per prompt, how well the weak and the strong model did, and its train/test split.

A `LabelledSet`'s frame has the columns `prompt` (str), `weak`, `strong` (float quality in [0, 1]: 1/0
correctness, or a judge score / 10), `split` ("train" | "test"), optional `weak_cost`, `strong_cost` (USD
per call), `weak_confidence` and `group` (e.g. the MMLU subject; for reports only, never a router feature).

Datasets that ship without a split get `hash_split`: a seeded hash of the prompt, so a prompt lands in
the same split on every machine and duplicates never straddle train and test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

DEFAULT_TEST_FRACTION = 0.5
DEFAULT_SPLIT_SEED = 0
ConfidenceKind = Literal["prob", "logprob"]


@dataclass(frozen=True)
class LabelledSet:
    """One dataset: the frame plus what its quality numbers mean."""

    name: str
    frame: pd.DataFrame
    quality: str = "accuracy"
    """What `weak`/`strong` measure: "accuracy" or "judge score / 10"."""
    strong_model: str = ""
    weak_model: str = ""
    confidence_kind: ConfidenceKind | None = None
    """What the weak-confidence column held ("prob" or "logprob"); None when there is none."""
    notices: tuple[str, ...] = ()
    """What the loader decided on its own (split used, rows dropped, ...), for the CLI to print."""

    @property
    def has_confidence(self) -> bool:
        return "weak_confidence" in self.frame.columns

    @property
    def train(self) -> pd.DataFrame:
        return self.frame[self.frame["split"] == "train"].reset_index(drop=True)

    @property
    def test(self) -> pd.DataFrame:
        return self.frame[self.frame["split"] == "test"].reset_index(drop=True)

    def cost_ratio(self, part: pd.DataFrame | None = None) -> float:
        """Mean weak/strong cost per call when costs are known, else 0 (savings then count strong calls)."""
        part = self.frame if part is None else part
        if {"weak_cost", "strong_cost"} <= set(part.columns) and part["strong_cost"].mean() > 0:
            return float(part["weak_cost"].mean() / part["strong_cost"].mean())
        return 0.0


def hash_split(
    prompts: Sequence[str], test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> np.ndarray:
    """'train'/'test' per prompt from sha256(seed, prompt): deterministic and independent of row order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = []
    for p in prompts:
        digest = hashlib.sha256(f"{seed}\x00{p}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out.append("test" if u < test_fraction else "train")
    return np.array(out, dtype=object)


def difficulty_label(frame: pd.DataFrame) -> np.ndarray:
    """Training target in [0, 1]: (1 + strong − weak) / 2. 1 = only the strong model gets it right,
    0.5 = both models do equally well, 0 = only the weak model does."""
    return ((1.0 + frame["strong"].to_numpy(float) - frame["weak"].to_numpy(float)) / 2.0).clip(0.0, 1.0)


def finish(frame: pd.DataFrame, test_fraction: float, seed: int) -> pd.DataFrame:
    frame = frame.dropna(subset=["prompt", "weak", "strong"]).reset_index(drop=True)
    frame["prompt"] = frame["prompt"].astype(str)
    frame["weak"] = frame["weak"].astype(float)
    frame["strong"] = frame["strong"].astype(float)
    if "split" not in frame.columns:
        frame["split"] = hash_split(frame["prompt"].tolist(), test_fraction, seed)
    return frame
