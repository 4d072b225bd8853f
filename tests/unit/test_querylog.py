"""Query log: records round-trip, prompts only when enabled, day files, `since`, concurrency, torn lines."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from serving.querylog import QueryLog, QueryLogConfig, QueryRecord, read_records

DAY = 86_400.0
T0 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()


def _record(i: int, ts: float = T0, **kw) -> QueryRecord:
    values = dict(request_id=f"r{i}", router="knn", tier="small", score=0.2, threshold=0.5,
                  tier_chain=("small",), latency_ms=12.5, prompt_tokens=10, completion_tokens=3,
                  prompt=f"prompt {i}", timestamp=ts)
    values.update(kw)
    return QueryRecord(**values)


def test_round_trip_without_prompts_by_default(tmp_path):
    log = QueryLog(tmp_path)
    escalated = _record(2, tier="large", tier_chain=("small", "large"), escalated=True, confidences=(0.3, 0.9))
    log.append(_record(1))
    log.append(escalated)
    assert log.flush()
    got = log.read()
    assert [r.request_id for r in got] == ["r1", "r2"]
    assert got[1].tier_chain == ("small", "large") and got[1].confidences == (0.3, 0.9) and got[1].escalated
    assert all(r.prompt is None for r in got)
    assert got[0] == _record(1, prompt=None)
    log.close()


def test_prompts_kept_when_enabled(tmp_path):
    log = QueryLog.from_config(QueryLogConfig(store_prompts=True), tmp_path)
    log.append(_record(1))
    log.close()
    [record] = read_records(tmp_path / "querylog")
    assert record.prompt == "prompt 1"


def test_day_files_and_since_until(tmp_path):
    log = QueryLog(tmp_path)
    for day in range(3):
        log.append(_record(day, ts=T0 + day * DAY))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "querylog-20250301.jsonl", "querylog-20250302.jsonl", "querylog-20250303.jsonl"]
    assert [r.request_id for r in log.read(since=T0 + DAY)] == ["r1", "r2"]
    until = datetime.fromtimestamp(T0 + DAY, UTC)
    assert [r.request_id for r in log.read(until=until)] == ["r0"]


def test_concurrent_appends_from_threads_all_land_whole(tmp_path):
    log = QueryLog(tmp_path, flush_interval_s=0.01)

    def worker(start: int) -> None:
        for i in range(start, start + 250):
            log.append(_record(i))

    threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = {r.request_id for r in read_records(tmp_path)}
    assert len(ids) == 1000 and log.dropped == 0


def test_append_does_not_block_when_the_queue_is_full(tmp_path):
    log = QueryLog(tmp_path / "sub", max_queue=5, flush_interval_s=5.0)
    log._writer = threading.Thread(target=lambda: None)  # no writer draining: the queue fills up
    started = time.perf_counter()
    for i in range(20):
        log.append(_record(i))
    assert time.perf_counter() - started < 0.5
    assert log.dropped == 15


def test_torn_line_is_skipped(tmp_path):
    log = QueryLog(tmp_path)
    log.append(_record(1))
    log.close()
    with (tmp_path / "querylog-20250301.jsonl").open("a") as f:
        f.write('{"request_id": "r9", "rou')
    assert [r.request_id for r in read_records(tmp_path)] == ["r1"]


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="extra"):
        QueryLogConfig(store_prompt=True)
    assert QueryLogConfig().resolved_path("/data").as_posix() == "/data/querylog"


def test_cascade_decisions_round_trip_with_their_thresholds(tmp_path):
    log = QueryLog(tmp_path)
    log.append(_record(1, tier="large", tier_chain=("small", "large"), escalated=True, confidences=(0.31,),
                       cascade_thresholds=(0.6,)))
    log.append(_record(2, confidences=(0.82,), cascade_thresholds=(0.6,)))
    log.close()
    first, second = read_records(tmp_path)
    assert first.cascade_thresholds == (0.6,)
    (d,) = first.cascade_decisions()
    assert (d.tier, d.confidence, d.threshold, d.escalated) == ("small", 0.31, 0.6, True)
    (d,) = second.cascade_decisions()
    assert (d.tier, d.escalated) == ("small", False)


def test_old_records_without_thresholds_still_read(tmp_path):
    (tmp_path / "querylog-20250301.jsonl").write_text(
        '{"request_id":"x","router":"knn","tier":"large","tier_chain":["small","large"],"escalated":true,'
        f'"confidences":[0.2],"timestamp":{T0}}}\n'
    )
    (record,) = read_records(tmp_path)
    (d,) = record.cascade_decisions()
    assert d.threshold is None and d.escalated and d.confidence == 0.2
