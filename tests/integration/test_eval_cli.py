"""`tierserve eval`, `train-router` and `report` end to end on small real inputs with the bundled embedder."""

from __future__ import annotations

import json

import pytest

from router.classifier import DifficultyClassifier
from router.eval.datasets import default_data_dir
from router.querylog import QueryLog, QueryRecord
from serving.cli import main

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
