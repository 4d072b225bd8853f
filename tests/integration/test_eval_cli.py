"""`tierserve eval`, `train-router` and `report` end to end on small real inputs with the bundled embedder."""

from __future__ import annotations

import json

import pytest

from router.classifier import DifficultyClassifier
from router.eval.datasets import default_data_dir
from serving.cli import main
from serving.querylog import QueryLog, QueryRecord

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "routellm").is_dir(), reason=f"shared routing data not found at {DATA} (set TIERSERVE_EVAL_DATA)"
)


@needs_data
def test_eval_writes_results_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--dataset", "mt-bench", "--data-dir", str(DATA), "--routers", "random,heuristic,knn,classifier",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-tune", "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "mt-bench" and results["n_test"] == 37
    assert results["strong_acc"] > results["weak_acc"] > 80
    assert set(results["routers"]) == {"random", "heuristic", "knn", "classifier"}
    for r in results["routers"].values():
        assert {"cpt20", "cpt50", "cpt80", "auc", "apgr", "curve"} <= set(r)
        assert r["curve"][0][0] == 0.0 and r["curve"][-1][0] == 100.0
        assert 0.0 <= r["cpt20"] <= r["cpt50"] <= r["cpt80"] <= 100.0
    assert results["oracle"]["apgr"] > max(r["apgr"] for r in results["routers"].values())
    png = (out / "cost_quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = capsys.readouterr().out
    assert "CPT50%" in table and "oracle" in table


@needs_data
def test_train_router_saves_a_loadable_classifier(tmp_path, capsys):
    rc = main(["train-router", "--dataset", "mbpp", "--data-dir", str(DATA), "--save", str(tmp_path / "clf"),
               "--cache-dir", str(tmp_path / "cache"), "--c", "0.3", "--quiet"])
    assert rc == 0
    clf = DifficultyClassifier.load(tmp_path / "clf", embedder_name="minilm:model", dim=384)
    assert clf.manifest.trained_on == "mbpp:train" and clf.manifest.n_train == 299


def test_train_router_from_the_query_log(tmp_path, capsys):
    log = QueryLog(tmp_path / "log", store_prompts=True)
    for i in range(30):
        hard = i % 3 == 0
        text = f"Prove theorem {i} about prime gaps rigorously" if hard else f"Say hello to user number {i}"
        log.append(QueryRecord(request_id=str(i), router="knn", tier="large" if hard else "small",
                               tier_chain=("small", "large") if hard else ("small",), escalated=hard, prompt=text))
    log.close()
    rc = main(["train-router", "--from-querylog", str(tmp_path / "log"), "--save", str(tmp_path / "clf"),
               "--cache-dir", str(tmp_path / "cache"), "--c", "1.0", "--quiet"])
    assert rc == 0
    clf = DifficultyClassifier.load(tmp_path / "clf")
    assert clf.manifest.n_train == 30 and clf.manifest.trained_on.startswith("querylog:")


def test_report_prints_escalation_per_bucket(tmp_path, capsys):
    log = QueryLog(tmp_path / "log")
    for i in range(10):
        log.append(QueryRecord(request_id=str(i), router="knn", tier="large" if i < 4 else "small",
                               tier_chain=("small", "large") if i < 4 else ("small",), escalated=i < 4,
                               timestamp=1_700_000_000.0 + i))
    log.close()
    rc = main(["report", "--querylog", str(tmp_path / "log"), "--bucket", "1D", "--png", str(tmp_path / "r.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "10 requests" in out and "40.0%" in out
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


PLAUT = DATA / "cascades" / "plaut-msp" / "llama3_8b_to_70b.jsonl"


@pytest.mark.skipif(not PLAUT.is_file(), reason=f"plaut-msp data not found at {PLAUT}")
def test_eval_draws_the_cascade_beside_the_routers(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--dataset", str(PLAUT), "--split-col", "split", "--weak-confidence-col", "weak_confidence",
               "--weak-confidence-kind", "prob", "--routers", "random,heuristic,cascade,cascade+heuristic",
               "--cost-ratio", "0.1143", "--out", str(out), "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["routers"]) == {"random", "heuristic", "cascade", "cascade+heuristic"}
    assert results["weak_confidence_kind"] == "prob" and results["n_test"] == 1947
    cascade = results["routers"]["cascade"]
    assert cascade["kind"] == "cascade" and cascade["cpt50"] == pytest.approx(34.8, abs=1.0)  # dataset README
    # honest cost: at CPT(50%) a cascade pays its strong calls plus a weak call on every query
    assert cascade["cost_at_cpt50"] == pytest.approx(cascade["cpt50"] + 11.43, abs=0.01)
    assert cascade["ci95"]["apgr"][0] > 0.55 and cascade["like_random"] is False
    assert results["routers"]["heuristic"]["like_random"] is True
    table = capsys.readouterr().out
    assert "weak confidence: probability" in table and "not distinguishable from random" in table
    png = (out / "cost_quality.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_eval_names_what_it_decided_and_refuses_cascades_without_confidence(tmp_path, capsys):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 300
    conf = rng.random(n)
    path = tmp_path / "mine.csv"
    pd.DataFrame({"prompt": [f"question {i} " + "word " * (i % 40) for i in range(n)],
                  "strong": np.where(rng.random(n) < 0.8, "True", "False"),
                  "weak": np.where(rng.random(n) < conf, "yes", "no"), "lp": np.log(conf),
                  "split": np.where(np.arange(n) % 4 == 0, "test", "train")}).to_csv(path, index=False)
    rc = main(["eval", "--dataset", str(path), "--weak-confidence-col", "lp", "--routers", "heuristic,cascade",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "note: using the file's 'split' column" in captured.err
    assert "read as a log-probability" in captured.err
    assert "weak confidence: log-probability" in captured.out
    assert "cost: strong calls only" in captured.out
    rc = main(["eval", "--dataset", str(path), "--routers", "cascade", "--out", str(tmp_path / "o2"), "--quiet"])
    assert rc != 0 and "needs the weak model's confidence per query" in capsys.readouterr().err


def test_report_shows_cascade_escalation_against_the_calibrated_target(tmp_path, capsys):
    import yaml

    tier = {"engine": {"kv_cache_memory_bytes": 268435456}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"tiers": [{"name": "small", "model": "m1", **tier},
                                             {"name": "large", "model": "m2", **tier}],
                                   "cascade": {"enabled": True, "tier_thresholds": {"small": 0.5},
                                               "tier_target_escalation_rates": {"small": 0.25}},
                                   "query_log": {"path": str(tmp_path / "log")}}))
    log = QueryLog(tmp_path / "log")
    for day in range(2):
        for i in range(100):
            up = i < (25 if day == 0 else 55)  # day 2 drifts: the small tier got less sure of itself
            log.append(QueryRecord(request_id=f"{day}-{i}", router="knn", tier="large" if up else "small",
                                   tier_chain=("small", "large") if up else ("small",), escalated=up,
                                   confidences=(0.3 if up else 0.8,), cascade_thresholds=(0.5,),
                                   timestamp=1_700_000_000.0 + day * 86_400 + i))
    log.close()
    rc = main(["report", "--config", str(cfg), "--bucket", "1D", "--png", str(tmp_path / "r.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cascade on small: 200 decisions, 40.0% escalated against a calibrated target of 25.0%" in out
    day_rows = [line for line in out.split("cascade on small")[1].splitlines() if line.startswith("2023-11-1")]
    assert len(day_rows) == 2
    assert "25.0%" in day_rows[0] and "HIGH" not in day_rows[0]
    assert "55.0%" in day_rows[1] and "HIGH" in day_rows[1]
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
