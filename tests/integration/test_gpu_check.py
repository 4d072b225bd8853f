"""benchmarks/gpu_check.py runs on CPU at its small size (the GPU machine runs it at full size), and its planner
check holds exactly there: the planner's parameter, weight and KV arithmetic equals what torch allocates."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_check import main


def test_gpu_check_runs_on_cpu_at_small_size(tmp_path: Path) -> None:
    result = main(["--size", "small", "--device", "cpu", "--cpu-threads", "1", "--out", str(tmp_path / "r.json")])
    assert (tmp_path / "r.json").is_file()
    embedder = result["embedder"]["cpu"]
    assert embedder["p50_batch1_ms"] > 0 and embedder["texts_per_s_batch"] > 0
    planner = result["planner"]
    assert planner["params"] == planner["torch_params"]
    assert planner["planner_weight_bytes"] == planner["torch_parameter_bytes"] == planner["torch_allocated_bytes"]
    assert planner["planner_kv_bytes"] == planner["torch_kv_bytes"]
