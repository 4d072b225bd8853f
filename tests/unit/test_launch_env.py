"""The environment a local cluster gets (`serving.launch`)."""

from __future__ import annotations

import subprocess

import psutil
import pytest

from serving.launch import haproxy_threads, start_local_cluster


@pytest.mark.parametrize(("cores", "threads"), [(1, "1"), (2, "1"), (3, "1"), (4, "2"), (8, "4"), (64, "4"), (None, "1")])
def test_haproxy_gets_half_the_cores_up_to_rays_default(cores: int | None, threads: str) -> None:
    assert haproxy_threads(cores) == threads


def test_a_cluster_that_missed_rays_startup_window_is_killed_and_started_again() -> None:
    older = subprocess.Popen(["sleep", "60"])  # a child from before: not the failed cluster's
    started: list[subprocess.Popen] = []

    def init() -> None:
        started.append(subprocess.Popen(["sleep", "60"]))  # the failed try's "raylet"
        if len(started) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    try:
        start_local_cluster(init)
        assert len(started) == 2
        assert not psutil.pid_exists(started[0].pid)  # the first try's process is killed (and reaped)
        assert started[1].poll() is None and older.poll() is None  # the new cluster's and older ones stay
    finally:
        for proc in (older, *started):
            proc.kill()
            proc.wait()


def test_other_startup_errors_and_the_last_try_are_raised() -> None:
    calls = []

    def broken(message: str):
        def init() -> None:
            calls.append(message)
            raise ValueError(message)
        return init

    with pytest.raises(ValueError, match="num_cpus"):
        start_local_cluster(broken("num_cpus must be positive"))
    assert calls == ["num_cpus must be positive"]  # not a startup timeout: raised at once
    calls.clear()
    with pytest.raises(ValueError, match="timed out during startup"):
        start_local_cluster(broken("node timed out during startup"), tries=2)
    assert len(calls) == 2
