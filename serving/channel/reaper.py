"""Engine processes die with their replica, however the replica dies.

vLLM runs its engine in processes of its own (`VLLM::EngineCore`, `VLLM::Worker`), spawned by the tier
replica. A replica that exits cleanly shuts them down; one killed with SIGKILL, or by `ray stop --force`, or
by its raylet dying, leaves them orphaned, holding their memory (and on a GPU node their GPU memory, so the
next start fails).

So each replica starts a small watchdog process (`python -m serving.channel.reaper`, in its own session so a
signal to the replica's process group does not take it along). Its stdin is a pipe whose write end only
the replica holds. While the replica lives, the watchdog keeps a snapshot of the replica's descendants
(refreshed every `POLL_S` and whenever the replica writes a line, as it does once its engine has started).
When the replica is gone the kernel closes the pipe; the watchdog reads EOF and SIGKILLs every process of
the last snapshot still alive (the same process: pid and start time match) and their children.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys

import psutil

logger = logging.getLogger(__name__)

POLL_S = 1.0


class EngineReaper:
    """The replica's side: starts the watchdog; `watch()` asks it to snapshot the descendants now."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "serving.channel.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def watch(self) -> None:
        """Snapshot the replica's processes now (call after the engine started its processes)."""
        try:
            self._proc.stdin.write(b"snapshot\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            logger.warning("the engine reaper (pid %d) is gone; engine processes may outlive this replica", self.pid)

    def close(self) -> None:
        """Normal shutdown: the engine is stopped; let the watchdog check and exit."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()


def descendants(owner_pid: int) -> dict[int, float]:
    """pid -> start time of every live descendant of `owner_pid` (empty if it is gone)."""
    try:
        children = psutil.Process(owner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for child in children:
        try:
            found[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            pass
    return found


def kill_survivors(snapshot: dict[int, float], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL each process of `snapshot` that is still the same process, and its children; returns the pids
    that were killed."""
    doomed: dict[int, psutil.Process] = {}
    for pid, created in snapshot.items():
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.01:
                continue  # the pid was reused by an unrelated process
            doomed[pid] = proc
            for child in proc.children(recursive=True):
                doomed.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    for proc in doomed.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(doomed.values()), timeout=timeout_s)
    return sorted(doomed)


def _watch(owner_pid: int) -> None:
    snapshot = descendants(owner_pid)
    stdin = sys.stdin.buffer.raw
    while True:
        readable, _, _ = select.select([stdin], [], [], POLL_S)
        if readable and not os.read(stdin.fileno(), 4096):
            break  # EOF: the owner closed the pipe or died
        if psutil.pid_exists(owner_pid):
            current = descendants(owner_pid)
            current.pop(os.getpid(), None)
            snapshot = current
    killed = kill_survivors(snapshot)
    if killed:
        print(f"tierserve reaper: replica {owner_pid} is gone; killed its leftover processes {killed}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
