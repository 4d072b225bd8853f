"""Where the CPU went during one load run: every process on the machine, by role, in CPU milliseconds per 1,000
output tokens.

Why: on a box whose cores the engine, the data plane and the load generator share, a ratio of tokens/s swings
with whatever else ran (up to 2x between invocations on the 2-core CPU box), while the CPU each part spends per
token moves far less. It says which process a difference comes from (the ingress, HAProxy, the router, the
tier replica, vLLM's own processes, Ray's daemons), and bounds what a change can cost where tokens/s cannot
resolve it: a part that spends x% of the CPU per token can cost at most about x% of the tokens/s of a run that
is CPU-bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

IDLE = "idle"
"""The cores' idle time, as a role: what the run left unused."""

ROLE_ORDER = ("engine worker", "engine scheduler", "bare API server", "tier replica", "ingress", "router", "HAProxy",
              "Ray", "load generator", "other", IDLE)
"""The report's column order."""


def process_role(title: str, *, is_load_generator: bool = False) -> str:
    """The role of a process from its title or command line (Ray and vLLM set telling titles)."""
    if is_load_generator:
        return "load generator"
    if title.startswith("VLLM::Worker"):
        return "engine worker"
    if title.startswith("VLLM::EngineCore"):
        return "engine scheduler"
    if "vllm.entrypoints.openai.api_server" in title:
        return "bare API server"
    if title.startswith("ray::ServeReplica:"):  # ray::ServeReplica:APP:DEPLOYMENT[.method]
        deployment = title[len("ray::ServeReplica:"):].split(":", 1)[-1].split(".", 1)[0].split(" ", 1)[0]
        if deployment.startswith("tier-"):
            return "tier replica"
        if deployment in ("ingress", "router"):
            return deployment
        return "Ray"
    if os.path.basename(title.split(" ", 1)[0]) == "haproxy":
        return "HAProxy"
    if title.startswith("ray::") or any(part in title for part in _RAY_DAEMONS):
        return "Ray"
    return "other"


_RAY_DAEMONS = ("/ray/core/src/ray/", "ray/_private/", "ray/dashboard/", "ray/autoscaler/")
"""Command-line fragments of Ray's own processes (raylet, the GCS, the dashboard and its agents, log monitor)."""


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds of every live process (by pid, with its role) and the cores' idle seconds."""

    by_pid: dict[int, tuple[str, float]]
    idle_s: float


def snapshot() -> CpuSnapshot:
    """Every process's CPU time so far, and the cores' idle time (about 50 ms for a Ray stack's ~100 processes)."""
    me = os.getpid()
    by_pid: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        info = proc.info
        times = info.get("cpu_times")
        if times is None:
            continue
        title = " ".join(info.get("cmdline") or []).strip() or (info.get("name") or "")
        by_pid[info["pid"]] = (process_role(title, is_load_generator=info["pid"] == me), times.user + times.system)
    return CpuSnapshot(by_pid, psutil.cpu_times().idle)


def cpu_by_role(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """CPU seconds each role spent between two snapshots, plus the cores' idle seconds (`IDLE`). A process that
    started in between counts from zero; one that ended in between is not counted (its time is gone with it)."""
    spent: dict[str, float] = {}
    for pid, (role, cpu_s) in after.by_pid.items():
        start = before.by_pid.get(pid)
        used = cpu_s - (start[1] if start and start[0] == role else 0.0)
        if used > 0:
            spent[role] = spent.get(role, 0.0) + used
    spent[IDLE] = max(0.0, after.idle_s - before.idle_s)
    return spent


def per_1k_tokens(spent_s: dict[str, float], output_tokens: float) -> dict[str, float]:
    """CPU milliseconds per 1,000 output tokens, by role (empty when no token came out)."""
    if output_tokens <= 0:
        return {}
    return {role: round(s * 1000 / (output_tokens / 1000), 2) for role, s in spent_s.items()}
