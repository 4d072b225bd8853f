"""Loaders on the real shared files: row counts after decontamination and the README's baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from router.eval.datasets import (
    default_data_dir,
    hash_split,
    load_dataset,
    load_table,
)

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "routellm").is_dir(), reason=f"shared routing data not found at {DATA} (set TIERSERVE_EVAL_DATA)"
)


def _pct(series: pd.Series) -> float:
    return round(float(series.mean()) * 100, 2)


@needs_data
def test_mmlu_decontaminated_rows_and_baselines():
    ds = load_dataset("mmlu", DATA)
    f = ds.frame
    assert len(f) == 14_037
    assert f["group"].nunique() == 57
    assert _pct(f["strong"]) == 80.59 and _pct(f["weak"]) == 68.09
    assert _pct((f["strong"] == 1) & (f["weak"] == 0)) == 17.78
    contaminated = set(pd.read_json(DATA / "routellm/mmlu/contaminated_prompts.jsonl", lines=True)["eval_prompt"])
    assert not contaminated & set(f["prompt"])


@needs_data
def test_gsm8k_decontaminated_rows_and_baselines():
    f = load_dataset("gsm8k", DATA).frame
    assert len(f) == 1_307
    assert _pct(f["strong"]) == 85.77 and _pct(f["weak"]) == 63.73
    assert _pct((f["strong"] == 1) & (f["weak"] == 0)) == pytest.approx(29.2, abs=0.05)


@needs_data
def test_mt_bench_turn_one_and_judge_means():
    ds = load_dataset("mt-bench", DATA)
    f = ds.frame
    assert len(f) == 72
    assert round(f["strong"].mean() * 10, 3) == 9.212 and round(f["weak"].mean() * 10, 3) == 8.281
    assert f["prompt"].str.startswith("Compose an engaging travel blog post").sum() == 0  # contaminated turn 1
    assert ds.quality == "judge score / 10"


@needs_data
@pytest.mark.parametrize(
    ("name", "n_train", "n_test"),
    [("arc-challenge", 1_039, 445), ("mbpp", 299, 128), ("winogrande", 887, 380)],
)
def test_routerbench_uses_its_own_splits(name, n_train, n_test):
    ds = load_dataset(name, DATA)
    train, test = ds.train, ds.test
    assert n_train - 10 <= len(train) <= n_train and n_test - 10 <= len(test) <= n_test  # ARC drops a few NaNs
    assert ds.strong_model == "gpt-4-1106-preview" and ds.weak_model == "mistralai/mixtral-8x7b-chat"
    assert ds.frame["strong"].mean() > ds.frame["weak"].mean()
    assert 0.0 < ds.cost_ratio() < 0.2  # Mixtral costs a small fraction of GPT-4
    prompts = ds.frame["prompt"]
    assert not prompts.str.startswith("['").any()  # list literals decoded
    assert prompts.str.len().mean() < 400  # the shared few-shot header is gone, the questions differ
    assert prompts.nunique() > 0.95 * len(prompts)


@needs_data
def test_routerbench_other_model_columns_and_a_clear_error():
    ds = load_dataset("mbpp", DATA, strong_model="meta/llama-2-70b-chat", weak_model="mistralai/mistral-7b-chat")
    assert ds.weak_model == "mistralai/mistral-7b-chat"
    with pytest.raises(ValueError, match="choose one of"):
        load_dataset("mbpp", DATA, strong_model="gpt-5")


@needs_data
def test_hash_split_is_deterministic_and_never_straddles():
    ds = load_dataset("mmlu", DATA)
    again = load_dataset("mmlu", DATA)
    assert (ds.frame["split"] == again.frame["split"]).all()
    train, test = set(ds.train["prompt"]), set(ds.test["prompt"])
    assert not train & test  # duplicated MMLU prompts land on one side
    assert 0.48 < len(ds.test) / len(ds.frame) < 0.52
    assert len(ds.train) + len(ds.test) == 14_037


def test_hash_split_depends_on_seed_and_fraction():
    prompts = [f"q{i}" for i in range(2000)]
    a, b = hash_split(prompts, 0.3, seed=0), hash_split(prompts, 0.3, seed=1)
    assert (a == hash_split(list(reversed(prompts)), 0.3, seed=0)[::-1]).all()  # order-independent
    assert (a != b).any()
    assert 0.26 < np.mean(a == "test") < 0.34
    with pytest.raises(ValueError):
        hash_split(prompts, 1.0)


def test_strip_shared_shots_keeps_each_question():
    from router.eval.builtin import strip_shared_shots

    shots = "Q: 1+1?\nA: 2\n\n" * 20
    prompts = pd.Series([shots + "Q: capital of France?", shots + "Q: 7*6?"])
    assert strip_shared_shots(prompts).tolist() == ["Q: capital of France?", "Q: 7*6?"]
    short = pd.Series(["Write a function to sort", "Write a function to add"])
    assert strip_shared_shots(short).tolist() == short.tolist()


def test_generic_table_with_split_column_and_score_scale(tmp_path):
    path = tmp_path / "mine.csv"
    pd.DataFrame(
        {"text": ["a", "b", "c", "d"], "big": [10, 8, 9, 10], "small": [5, 8, 2, 10], "part": ["train", "test"] * 2}
    ).to_csv(path, index=False)
    ds = load_table(path, prompt_col="text", strong_col="big", weak_col="small", split_col="part", score_max=10)
    assert ds.train["prompt"].tolist() == ["a", "c"]
    assert ds.frame["strong"].tolist() == [1.0, 0.8, 0.9, 1.0]
    with pytest.raises(ValueError, match="score_max"):
        load_table(path, prompt_col="text", strong_col="big", weak_col="small")
    with pytest.raises(ValueError, match="missing columns"):
        load_table(path)


def test_generic_jsonl_gets_a_hash_split(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = pd.DataFrame({"prompt": [f"p{i}" for i in range(200)], "strong": 1, "weak": [i % 2 for i in range(200)]})
    rows.to_json(path, orient="records", lines=True)
    ds = load_dataset(str(path), DATA)
    assert set(ds.frame["split"]) == {"train", "test"} and ds.name == "log"
    with pytest.raises(FileNotFoundError, match="not one of"):
        load_dataset("no-such-set", DATA)


def _write(tmp_path, name, **columns):
    path = tmp_path / name
    frame = pd.DataFrame(columns)
    if name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    return path


def test_a_split_column_is_used_and_said_so(tmp_path):
    path = _write(tmp_path, "s.csv", prompt=list("abcd"), strong=[1, 1, 0, 1], weak=[0, 1, 0, 0],
                  split=["train", "test", "train", "test"])
    ds = load_table(path)
    assert ds.test["prompt"].tolist() == ["b", "d"]
    assert any("'split' column" in n for n in ds.notices)
    plain = load_table(_write(tmp_path, "p.csv", prompt=list("abcd"), strong=[1] * 4, weak=[0] * 4))
    assert any("hash split" in n and "50%" in n for n in plain.notices)


def test_dropped_rows_are_counted(tmp_path):
    path = _write(tmp_path, "d.csv", prompt=list("abcde"), strong=[1, None, 0, 1, 1], weak=[0, 1, None, 0, 1])
    ds = load_table(path)
    assert len(ds.frame) == 3
    assert any("dropped 2 of 5 rows" in n for n in ds.notices)


def test_one_cost_column_alone_is_refused(tmp_path):
    path = _write(tmp_path, "c.csv", prompt=list("ab"), strong=[1, 1], weak=[0, 1], sc=[1.0, 1.0])
    with pytest.raises(ValueError, match="--strong-cost-col needs --weak-cost-col"):
        load_table(path, strong_cost_col="sc")


def test_string_booleans_are_parsed_or_named(tmp_path):
    path = _write(tmp_path, "b.csv", prompt=list("abcd"), strong=["True", "True", "yes", "False"],
                  weak=["False", "no", "Yes", "true"])
    ds = load_table(path)
    assert ds.frame["strong"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert ds.frame["weak"].tolist() == [0.0, 0.0, 1.0, 1.0]
    bad = _write(tmp_path, "bad.csv", prompt=list("abc"), strong=["1", "1", "maybe"], weak=["0", "1", "0"])
    with pytest.raises(ValueError, match=r"bad.csv: column 'strong', row 2 .*'maybe'"):
        load_table(bad)


def test_score_max_on_binary_data_and_negative_scores(tmp_path):
    binary = _write(tmp_path, "z.csv", prompt=list("ab"), strong=[1, 0], weak=[0, 0])
    with pytest.raises(ValueError, match="only 0/1 values"):
        load_table(binary, score_max=10)
    negative = _write(tmp_path, "n.csv", prompt=list("ab"), strong=[1, -1], weak=[0, 0])
    with pytest.raises(ValueError, match="negative") as err:
        load_table(negative)
    assert "pass score_max" not in str(err.value)


def test_a_dearer_weak_model_is_flagged_and_the_table_stays_aligned(tmp_path):
    from router.eval.report import format_table
    from router.eval.runner import evaluate

    n = 60
    path = _write(tmp_path, "w.csv", prompt=[f"q{i}" for i in range(n)], strong=[1] * n,
                  weak=[i % 2 for i in range(n)], sc=[1.0] * n, wc=[2.0] * n)
    ds = load_table(path, strong_cost_col="sc", weak_cost_col="wc")
    assert any("costs more per call" in n for n in ds.notices)
    table = format_table(evaluate(ds, ["random", "heuristic"], None, progress=False, n_boot=20))
    header = next(r for r in table.splitlines() if r.startswith("policy"))
    random_row = next(r for r in table.splitlines() if r.startswith("random"))
    assert len(random_row.split("  (")[0]) == len(header)  # negative savings keep the columns aligned
    saved = random_row.split()[-1]
    assert saved.startswith("-") and saved.endswith("%") and float(saved[1:-1]) > 0


def test_prompts_in_both_splits_are_counted(tmp_path):
    path = _write(tmp_path, "o.csv", prompt=["a", "a", "b", "c", "c"], strong=[1] * 5, weak=[0] * 5,
                  part=["train", "test", "train", "train", "test"])
    ds = load_dataset(str(path), tmp_path, split_col="part")
    assert any(n.startswith("2 distinct prompts appear in both train and test") for n in ds.notices)


def test_weak_confidence_as_logprob(tmp_path):
    path = _write(tmp_path, "l.jsonl", prompt=list("abc"), strong=[1, 1, 1], weak=[0, 1, 1],
                  lp=[np.log(0.2), np.log(0.9), 0.0])
    ds = load_table(path, weak_confidence_col="lp")
    assert ds.confidence_kind == "logprob"
    assert ds.frame["weak_confidence"].tolist() == pytest.approx([0.2, 0.9, 1.0])
    assert any("log-probability" in n for n in ds.notices)
    with pytest.raises(ValueError, match="log-probability"):
        load_table(path, weak_confidence_col="lp", weak_confidence_kind="prob")
