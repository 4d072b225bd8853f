"""Labelled routing data in one frame: per prompt, how well the weak and the strong model did.

Every loader returns a `LabelledSet` whose frame has the columns
`prompt` (str), `weak`, `strong` (float quality in [0, 1]: 1/0 correctness, or a judge score / 10),
`split` ("train" | "test"), optional `weak_cost`, `strong_cost` (USD per call) and optional `group`
(e.g. the MMLU subject; for reports only, never a router feature).

Datasets that ship without a split get `hash_split`: a seeded hash of the prompt, so a prompt lands in
the same split on every machine and duplicates never straddle train and test.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

ROUTELLM_STRONG = "gpt-4-1106-preview"
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTERBENCH_STRONG = "gpt-4-1106-preview"
ROUTERBENCH_WEAK = "mistralai/mixtral-8x7b-chat"
BUILTIN = ("mmlu", "gsm8k", "mt-bench", "arc-challenge", "mbpp", "winogrande")
_ROUTERBENCH_FILES = {"arc-challenge": "arc_challenge", "mbpp": "mbpp", "winogrande": "winograde"}
DEFAULT_TEST_FRACTION = 0.5
DEFAULT_SPLIT_SEED = 0
ConfidenceKind = Literal["prob", "logprob"]
CASCADE_BUILTIN = {"plaut-msp": "cascades/plaut-msp/llama3_8b_to_70b.jsonl"}
"""Labelled sets that carry the weak model's confidence (for cascades), by name → path under the data dir."""


def default_data_dir() -> Path:
    """`$TIERSERVE_EVAL_DATA`, else `<repo root>/../shared/data` (the shared data beside the checkout)."""
    env = os.environ.get("TIERSERVE_EVAL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


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


def _contaminated(path: Path) -> set[str]:
    return set(pd.read_json(path, lines=True)["eval_prompt"].tolist())


def _finish(frame: pd.DataFrame, test_fraction: float, seed: int) -> pd.DataFrame:
    frame = frame.dropna(subset=["prompt", "weak", "strong"]).reset_index(drop=True)
    frame["prompt"] = frame["prompt"].astype(str)
    frame["weak"] = frame["weak"].astype(float)
    frame["strong"] = frame["strong"].astype(float)
    if "split" not in frame.columns:
        frame["split"] = hash_split(frame["prompt"].tolist(), test_fraction, seed)
    return frame


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
    frame = _finish(frame[["prompt", "weak", "strong", "group"]], test_fraction, seed)
    return LabelledSet("mmlu", frame, "accuracy", ROUTELLM_STRONG, ROUTELLM_WEAK)


def load_gsm8k(
    data_dir: Path, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = DEFAULT_SPLIT_SEED
) -> LabelledSet:
    """RouteLLM GSM8K (the 1,319 test questions, outcomes only there); 12 contaminated → 1,307."""
    root = Path(data_dir) / "routellm" / "gsm8k"
    raw = pd.read_csv(root / "gsm8k_responses.csv")
    raw = raw[~raw["prompt"].isin(_contaminated(root / "contaminated_prompts.jsonl"))]
    frame = raw.rename(columns={ROUTELLM_WEAK: "weak", ROUTELLM_STRONG: "strong"})
    frame = _finish(frame[["prompt", "weak", "strong"]], test_fraction, seed)
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
    frame = _finish(frame[["prompt", "weak", "strong", "group"]], test_fraction, seed)
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
    stem = _ROUTERBENCH_FILES[name]
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
    frame = _finish(frame, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
    return LabelledSet(name, frame, "accuracy", strong_model, weak_model)


_ROUTERBENCH_META = {"sample_id", "prompt", "eval_name", "oracle_model_to_route_to"}


_TRUE = {"true", "t", "yes", "y", "correct", "right", "pass", "passed"}
_FALSE = {"false", "f", "no", "n", "wrong", "incorrect", "fail", "failed"}


def _numbers(raw: pd.Series, path: Path, col: str) -> pd.Series:
    """A column as floats: numbers, booleans, or the words True/False, yes/no, correct/wrong (any case).
    Anything else fails naming the file, the column and the row."""
    if pd.api.types.is_bool_dtype(raw) or pd.api.types.is_numeric_dtype(raw):
        return raw.astype(float)
    out = np.empty(len(raw))
    for row, v in enumerate(raw.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out[row] = np.nan
        elif isinstance(v, bool | int | float | np.number):
            out[row] = float(v)
        else:
            word = str(v).strip().lower()
            if word in _TRUE:
                out[row] = 1.0
            elif word in _FALSE:
                out[row] = 0.0
            elif word in ("", "nan", "na", "null", "none"):
                out[row] = np.nan
            else:
                try:
                    out[row] = float(word)
                except ValueError:
                    raise ValueError(
                        f"{path}: column {col!r}, row {row} (counting data rows from 0) holds {v!r}: not a number "
                        "or true/false; use 0/1, true/false or yes/no"
                    ) from None
    return pd.Series(out, index=raw.index)


def _check_scale(values: pd.Series, path: Path, col: str, score_max: float, flag: str) -> None:
    lo, hi = values.min(), values.max()
    if lo < 0:
        raise ValueError(f"{path}: {col} holds negative quality ({lo:g}); quality must lie in [0, {flag}] "
                         f"(a scale cannot fix a sign: correct or drop those rows)")
    if hi > score_max:
        raise ValueError(f"{path}: {col} quality reaches {hi:g}, above [0, {score_max:g}]; pass score_max ({flag}) "
                         f"with the scores' maximum (e.g. {flag} 10 for judge scores out of 10)")
    if score_max != 1.0 and set(values.dropna().unique()) <= {0.0, 1.0}:
        raise ValueError(f"{path}: {col} holds only 0/1 values, yet {flag} {score_max:g} would turn a correct "
                         f"answer into {1 / score_max:g}; drop {flag} (it is for scores out of N)")


def load_table(
    path: Path,
    *,
    prompt_col: str = "prompt",
    strong_col: str = "strong",
    weak_col: str = "weak",
    split_col: str | None = None,
    strong_cost_col: str | None = None,
    weak_cost_col: str | None = None,
    score_max: float = 1.0,
    weak_confidence_col: str | None = None,
    weak_confidence_kind: ConfidenceKind | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> LabelledSet:
    """Any CSV or JSONL with a prompt column and a weak and strong quality column (bool, 0/1, true/false,
    yes/no or a score out of `score_max`). `split_col` holds "train"/"test"; without it a column named
    `split` is used when it holds those values, else the hash split applies. `weak_confidence_col` holds the
    weak model's confidence in its answer, a probability (`prob`) or a log-probability (`logprob`); the
    frame's `weak_confidence` is always a probability. Everything the loader decided on its own is in
    `notices`."""
    path = Path(path)
    notices: list[str] = []
    if bool(strong_cost_col) != bool(weak_cost_col):
        given, missing = ("--strong-cost-col", "--weak-cost-col") if strong_cost_col else ("--weak-cost-col",
                                                                                          "--strong-cost-col")
        raise ValueError(f"{given} needs {missing} too: the cost of a routed or cascaded query counts both "
                         "models' calls (without either, savings count strong-model calls)")
    if path.suffix in (".jsonl", ".json"):
        raw = pd.read_json(path, lines=path.suffix == ".jsonl")
    else:
        raw = pd.read_csv(path)
    if split_col is None and "split" in raw.columns:
        values = set(raw["split"].astype(str).str.lower())
        if values <= {"train", "test"}:
            split_col = "split"
            notices.append(f"using the file's 'split' column for train/test ({(raw['split'].astype(str).str.lower() == 'test').mean():.0%} test); "
                           "pass --split-col to name another")
        else:
            notices.append(f"column 'split' holds {sorted(values)[:5]}, not train/test: ignored")
    wanted = [c for c in (prompt_col, strong_col, weak_col, split_col, strong_cost_col, weak_cost_col,
                          weak_confidence_col) if c]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; it has {list(raw.columns)} (see --prompt-col etc.)")
    flag = "--score-max"
    frame = pd.DataFrame({"prompt": raw[prompt_col]})
    for col, src in (("weak", weak_col), ("strong", strong_col)):
        values = _numbers(raw[src], path, src)
        _check_scale(values, path, src, score_max, flag)
        frame[col] = values / score_max
    if split_col:
        frame["split"] = raw[split_col].astype(str).str.lower()
        bad = sorted(set(frame["split"]) - {"train", "test"})
        if bad:
            raise ValueError(f"{path}: column {split_col!r} must hold 'train' or 'test', found {bad}")
    else:
        notices.append(f"no split column: a hash split of the prompt puts {test_fraction:.0%} in test "
                       f"(--test-fraction, --split-seed; or --split-col)")
    if strong_cost_col and weak_cost_col:
        frame["strong_cost"] = _numbers(raw[strong_cost_col], path, strong_cost_col)
        frame["weak_cost"] = _numbers(raw[weak_cost_col], path, weak_cost_col)
        w, st = frame["weak_cost"].mean(), frame["strong_cost"].mean()
        if w > st:
            notices.append(f"the weak model costs more per call than the strong one (mean {w:.4g} vs {st:.4g}): "
                           "routing to it loses money and 'saved' comes out negative; are --weak-cost-col and "
                           "--strong-cost-col swapped?")
    kind = None
    if weak_confidence_col:
        conf = _numbers(raw[weak_confidence_col], path, weak_confidence_col)
        kind = _confidence_kind(conf, path, weak_confidence_col, weak_confidence_kind, notices)
        frame["weak_confidence"] = np.exp(conf) if kind == "logprob" else conf
    before = len(frame)
    needed = ["prompt", "weak", "strong", *(["weak_confidence"] if weak_confidence_col else [])]
    frame = frame.dropna(subset=needed)
    if len(frame) < before:
        notices.append(f"dropped {before - len(frame)} of {before} rows with no prompt, quality"
                       + (" or confidence" if weak_confidence_col else ""))
    ds = LabelledSet(path.stem, _finish(frame, test_fraction, seed), "accuracy", strong_col, weak_col,
                     confidence_kind=kind, notices=tuple(notices))
    return ds


def _confidence_kind(conf: pd.Series, path: Path, col: str, kind: ConfidenceKind | None,
                     notices: list[str]) -> ConfidenceKind:
    lo, hi = conf.min(), conf.max()
    if kind is None:
        if hi <= 0 and lo < 0:
            kind = "logprob"
        elif 0 <= lo and hi <= 1:
            kind = "prob"
        else:
            raise ValueError(f"{path}: {col} spans [{lo:g}, {hi:g}]: neither a probability nor a log-probability; "
                             "pass --weak-confidence-kind or fix the column")
        notices.append(f"weak confidence {col!r} read as a {'log-probability' if kind == 'logprob' else 'probability'}"
                       f" (values in [{lo:g}, {hi:g}]); pass --weak-confidence-kind to say so")
    if kind == "prob" and not (0 <= lo and hi <= 1):
        raise ValueError(f"{path}: {col} spans [{lo:g}, {hi:g}], outside [0, 1]; is it a log-probability? "
                         "(--weak-confidence-kind logprob)")
    if kind == "logprob" and hi > 0:
        raise ValueError(f"{path}: {col} reaches {hi:g} > 0, impossible for a log-probability; is it a probability? "
                         "(--weak-confidence-kind prob)")
    return kind


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
    if name_or_path in _ROUTERBENCH_FILES:
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


def describe(ds: LabelledSet) -> dict:
    """Row counts and baselines per split, for logs and tests."""
    out = {"dataset": ds.name, "n": len(ds.frame)}
    for part_name in ("train", "test"):
        part = ds.frame[ds.frame["split"] == part_name]
        out[part_name] = {
            "n": len(part),
            "strong": float(part["strong"].mean() * 100) if len(part) else float("nan"),
            "weak": float(part["weak"].mean() * 100) if len(part) else float("nan"),
        }
    return out
