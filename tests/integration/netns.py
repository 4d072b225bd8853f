"""Two hosts on this machine: network namespaces joined by veth pairs (iproute2), for tests of what crosses a
network. Needs root and `ip`; traffic goes only to the addresses made here and to loopback.

    head (10.77.0.1) <--link--> worker (10.77.0.2)
    head (10.77.1.2) <--------> this namespace (10.77.1.1), where the test's client runs
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HEAD_IP, WORKER_IP, CLIENT_IP, HEAD_CLIENT_IP = "10.77.0.1", "10.77.0.2", "10.77.1.1", "10.77.1.2"


def available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (deploy/system-deps.sh installs it)"
    probe = subprocess.run(["ip", "netns", "add", "tierserve-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "tierserve-probe"], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Hosts:
    head: str
    worker: str
    link: str
    """The head's end of the head-worker link (cut it with `cut()`)."""

    def run(self, ns: str, cmd: list[str], **kwargs: object) -> subprocess.Popen:
        """Start `cmd` inside namespace `ns`, in a process group of its own (so it can be killed whole)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kwargs)  # type: ignore[arg-type]

    def cut(self) -> None:
        """Cut the head-worker link without telling either end: packets are dropped, no RST, no FIN."""
        _ip("netns", "exec", self.head, "ip", "link", "set", self.link, "down")


@contextmanager
def two_hosts(prefix: str = "ts") -> Iterator[Hosts]:
    """Make the namespaces and links; on exit kill every process left in them and delete them."""
    head, worker = f"{prefix}-head", f"{prefix}-worker"
    for ns in (head, worker):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    _ip("netns", "add", head)
    _ip("netns", "add", worker)
    try:
        _ip("link", "add", f"{prefix}-hw", "type", "veth", "peer", "name", f"{prefix}-wh")
        _ip("link", "set", f"{prefix}-hw", "netns", head)
        _ip("link", "set", f"{prefix}-wh", "netns", worker)
        _ip("link", "add", f"{prefix}-c", "type", "veth", "peer", "name", f"{prefix}-hc")
        _ip("link", "set", f"{prefix}-hc", "netns", head)
        for ns, dev, addr in ((head, f"{prefix}-hw", HEAD_IP), (worker, f"{prefix}-wh", WORKER_IP),
                              (head, f"{prefix}-hc", HEAD_CLIENT_IP)):
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            _ip("netns", "exec", ns, "ip", "link", "set", dev, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _ip("addr", "add", f"{CLIENT_IP}/24", "dev", f"{prefix}-c")
        _ip("link", "set", f"{prefix}-c", "up")
        yield Hosts(head, worker, f"{prefix}-hw")
    finally:
        for ns in (head, worker):
            _kill_all_in(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{prefix}-c"], capture_output=True)


def _kill_all_in(ns: str) -> None:
    for _ in range(3):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.5)
