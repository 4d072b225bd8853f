"""The shared sets by name: RouteLLM's MMLU, GSM8K and MT-Bench, and RouterBench's ARC-Challenge, MBPP, Winogrande."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pandas as pd

from router.eval.labelled import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    LabelledSet,
    finish,
)

ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTERBENCH_STRONG = "gpt-4-1106-preview"
ROUTERBENCH_WEAK = "mistralai/mixtral-8x7b-chat"
ROUTERBENCH_FILES = {"arc-challenge": "arc_challenge", "mbpp": "mbpp", "winogrande": "winograde"}


def _contaminated(path: Path) -> set[str]:
    return set(pd.read_json(path, lines=True)["eval_prompt"].tolist())


def load_mmlu(
    data_dir: Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> LabelledSet:
    """RouteLLM MMLU: 57 subject CSVs, 14,042 rows; its 5 contaminated prompts dropped → 14,037."""
    root = Path(data_dir) / "routellm" / "mmlu"
    files = sorted((root / "responses").glob("mmlu_*.csv"))
    if len(files) != 57:
        raise FileNotFoundError(f"{root / 'responses'}: expected 57 mmlu_*.csv files, found {len(files)}")
    parts = [pd.read_csv(f).assign(group=f.stem.removeprefix("mmlu_")) for f in files]
    raw = pd.concat(parts, ignore_index=True)
    raw = raw[~raw["prompt"].isin(_contaminated(root / "contaminated_prompts.jsonl"))]
    frame = raw.rename(columns={ROUTELLM_WEAK: "weak", ROUTELLM_STRONG: "strong"})
    frame = finish(frame[["prompt", "weak", "strong", "group"]], test_fraction, seed)
    return LabelledSet("mmlu", frame, "accuracy", ROUTELLM_STRONG, ROUTELLM_WEAK)


def load_gsm8k(
    data_dir: Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> LabelledSet:
    """RouteLLM GSM8K (the 1,319 test questions, outcomes only there); 12 contaminated → 1,307."""
    root = Path(data_dir) / "routellm" / "gsm8k"
    raw = pd.read_csv(root / "gsm8k_responses.csv")
    raw = raw[~raw["prompt"].isin(_contaminated(root / "contaminated_prompts.jsonl"))]
    frame = raw.rename(columns={ROUTELLM_WEAK: "weak", ROUTELLM_STRONG: "strong"})
    frame = finish(frame[["prompt", "weak", "strong"]], test_fraction, seed)
    return LabelledSet("gsm8k", frame, "accuracy", ROUTELLM_STRONG, ROUTELLM_WEAK)


def load_mt_bench(
    data_dir: Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> LabelledSet:
    """MT-Bench: 80 questions, 8 contaminated → 72. Routed on turn 1; quality is the mean GPT-4 judge
    score of both turns / 10 (RouteLLM averages over both turns of the routed model)."""
    root = Path(data_dir) / "routellm" / "mt_bench"
    questions = pd.read_json(root / "question.jsonl", lines=True)
    bad = _contaminated(root / "contaminated_prompts.jsonl")
    questions["prompt"] = questions["turns"].map(lambda t: t[0])
    keep = ~(questions["prompt"].isin(bad) | questions["turns"].map(lambda t: t[1]).isin(bad))
    questions = questions[keep]
    judgements = pd.read_json(root / "judgements.jsonl", lines=True)
    per_model = judgements.groupby(["question_id", "model"])["score"].mean().unstack("model") / 10.0
    frame = questions[["question_id", "prompt", "category"]].merge(
        per_model[[ROUTELLM_WEAK, ROUTELLM_STRONG]], left_on="question_id", right_index=True, how="left"
    )
    frame = frame.rename(columns={ROUTELLM_WEAK: "weak", ROUTELLM_STRONG: "strong", "category": "group"})
    frame = finish(frame[["prompt", "weak", "strong", "group"]], test_fraction, seed)
    return LabelledSet("mt-bench", frame, "judge score / 10", ROUTELLM_STRONG, ROUTELLM_WEAK)


def _routerbench_text(raw: str) -> str:
    """RouterBench stores each prompt as a Python list literal of strings; join the parts."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def strip_shared_shots(prompts: pd.Series, min_chars: int = 200) -> pd.Series:
    """Drop a few-shot header every prompt shares (cut after its last blank line), keeping the question.

    RouterBench's ARC-C and Winogrande prompts repeat the same ~1,500 characters of examples before each
    question; a 256-token embedder would see only those, and every prompt would embed alike.
    """
    prefix = os.path.commonprefix(prompts.tolist())
    cut = prefix.rfind("\n\n")
    if len(prefix) < min_chars or cut < 0:
        return prompts
    return prompts.str.slice(cut + 2)


def load_routerbench(
    data_dir: Path, name: str, *, strong_model: str = ROUTERBENCH_STRONG, weak_model: str = ROUTERBENCH_WEAK
) -> LabelledSet:
    """A RouterBench subset with its own train/test files; any two of its 11 models as strong/weak.
    Prompts are decoded from their list literals and stripped of the few-shot header they all share."""
    stem = ROUTERBENCH_FILES[name]
    parts = []
    for split in ("train", "test"):
        raw = pd.read_csv(Path(data_dir) / "routerbench" / f"{stem}_{split}.csv")
        for model in (strong_model, weak_model):
            if model not in raw.columns:
                models = sorted(c for c in raw.columns if "|" not in c and c not in _ROUTERBENCH_META)
                raise ValueError(f"model {model!r} is not in {stem}_{split}.csv; choose one of {models}")
        part = pd.DataFrame(
            {
                "prompt": raw["prompt"],
                "weak": raw[weak_model],
                "strong": raw[strong_model],
                "split": split,
            }
        )
        costs = (f"{weak_model}|total_cost", f"{strong_model}|total_cost")
        if all(c in raw.columns for c in costs):
            part["weak_cost"], part["strong_cost"] = raw[costs[0]], raw[costs[1]]
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    frame["prompt"] = strip_shared_shots(frame["prompt"].astype(str).map(_routerbench_text))
    frame = finish(frame, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
    return LabelledSet(name, frame, "accuracy", strong_model, weak_model)


_ROUTERBENCH_META = {"sample_id", "prompt", "eval_name", "oracle_model_to_route_to"}
