"""Any labelled CSV/JSONL file: columns named by the caller, qualities as numbers or yes/no words, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from router.eval.labelled import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    ConfidenceKind,
    LabelledSet,
    finish,
)

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
    ds = LabelledSet(path.stem, finish(frame, test_fraction, seed), "accuracy", strong_col, weak_col,
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
