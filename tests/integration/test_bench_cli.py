"""`tierserve bench --plumbing` end to end: a real Serve app on the scripted engine, vLLM's benchmark, the outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_plumbing_bench_writes_sane_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--plumbing", "--rounds", "1", "--concurrency", "4",
           "--num-prompts", "8", "--input-len", "16", "--output-len", "8", "--port", "8769", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    # c=4 stream and unary, plus the concurrency-1 stream for TTFT
    assert sorted((r["spec"]["concurrency"], r["spec"]["stream"]) for r in runs) == [(1, True), (4, False), (4, True)]
    for r in runs:
        res = r["result"]
        assert r["target"] == "plumbing" and res["failed"] == 0
        assert res["completed"] == r["spec"]["num_prompts"]
        assert res["output_tok_s"] > 0 and res["request_s"] > 0
        assert 0 < res["ttft_p50_ms"] <= res["ttft_p99_ms"] and res["ttft_p50_ms"] <= res["e2el_p99_ms"]
    # Where the CPU went, per run: the load generator (this bench) always; the stack's processes over the runs
    assert all(r["cpu_ms_per_1k_tok"]["load generator"] > 0 for r in runs)
    stack_ms = sum(r["cpu_ms_per_1k_tok"].get(role, 0.0) for r in runs for role in ("tier replica", "ingress", "HAProxy"))
    assert stack_ms > 0
    table = (out / "results.md").read_text()
    assert table.count("| plumbing |") == 6 and "output tok/s" in table  # 3 loads: the figures and the CPU rows
    assert "cost per 1k output tok" in table and "no GPU cost, n/a (CPU)" in table  # deploy/cpu.yaml's tiers
    cpu_header = next(line for line in table.splitlines() if line.startswith("| load | path | ") and "busy" in line)
    assert "Where the CPU went" in table and "load generator" in cpu_header and "tier replica" in cpu_header
    assert (out / "throughput.png").stat().st_size > 1000
    assert "results.json" in done.stdout
    assert "ingress: haproxy" in done.stdout  # the mode the chart deploys
