"""The environment a local cluster gets (`serving.launch`)."""

from __future__ import annotations

import pytest

from serving.launch import haproxy_threads


@pytest.mark.parametrize(("cores", "threads"), [(1, "1"), (2, "1"), (3, "1"), (4, "2"), (8, "4"), (64, "4"), (None, "1")])
def test_haproxy_gets_half_the_cores_up_to_rays_default(cores: int | None, threads: str) -> None:
    assert haproxy_threads(cores) == threads
