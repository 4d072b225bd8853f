"""Placement off the engine's cores, on a real process tree (a stand-in for a tier replica, vLLM's EngineCore
and its Worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A "replica" that starts a "scheduler" (inherits its mask) and a "worker" that binds itself to core 0, as
# vLLM's Worker binds its OpenMP threads to `cpu_threads_bind`, then places itself off the engine's cores.
TREE = """
import json, os, subprocess, sys, time
import psutil
from serving.affinity import pin_off_engine_cores
sched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
worker = subprocess.Popen([sys.executable, "-c", "import os, time; os.sched_setaffinity(0, {0}); time.sleep(60)"])
deadline = time.monotonic() + 20
while psutil.Process(worker.pid).cpu_affinity() != [0] and time.monotonic() < deadline:
    time.sleep(0.05)
pin_off_engine_cores(ENGINE, "test")
print(json.dumps({name: psutil.Process(pid).cpu_affinity()
                  for name, pid in [("replica", os.getpid()), ("scheduler", sched.pid), ("worker", worker.pid)]}))
sched.kill(); worker.kill()
"""


def _placement(engine_cpus: str) -> dict[str, list[int]]:
    script = TREE.replace("ENGINE", repr(engine_cpus))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1")
def test_the_replica_and_scheduler_move_off_the_engine_cores_the_worker_stays() -> None:
    off = sorted(os.sched_getaffinity(0) - {0})
    assert _placement("0") == {"replica": off, "scheduler": off, "worker": [0]}


@pytest.mark.skipif(0 not in os.sched_getaffinity(0), reason="needs core 0")
def test_nothing_moves_when_the_engine_has_every_core() -> None:
    every = sorted(os.sched_getaffinity(0))
    placed = _placement(",".join(map(str, every)))
    assert placed["replica"] == every and placed["scheduler"] == every
