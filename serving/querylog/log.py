"""Query log: one JSON line per request with the routing decision, the tier chain, latency and tokens.

Files are `<dir>/querylog-YYYYMMDD.jsonl` (UTC day), so `read(since=...)` skips whole days. `append()` only
puts the record on a bounded queue; a daemon thread, started on first use, writes batches with one
`write()` on an O_APPEND descriptor, so several ingress replicas can share the folder without interleaving
lines. When the queue is full (the disk stalls), records are dropped and counted instead of blocking the
event loop. Prompt text is stored only when `store_prompts` is on.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from router.configbase import StrictModel

logger = logging.getLogger(__name__)

Status = Literal["ok", "error", "rejected", "cancelled"]


class QueryLogConfig(StrictModel):
    """`query_log:` section of the app config."""

    enabled: bool = True
    """Write one record per routed request."""
    path: str | None = None
    """Folder of the JSONL files. None: `<data_dir>/querylog`."""
    store_prompts: bool = False
    """Also store the routed text (the last user message). Needed for `tierserve train-router` from the log;
    off by default because prompts may hold personal data."""
    max_queue: int = Field(default=10_000, ge=1)
    """Records waiting for the writer thread; beyond this new records are dropped (and counted)."""
    flush_interval_s: float = Field(default=0.5, gt=0.0, le=60.0)
    """Longest a record waits before it is written."""
    retention_days: float | None = Field(default=None, gt=0.0, le=3650.0)
    """Days prompts may be kept: the router's learned exemplars (which hold the prompt's text) expire after
    this, and an answer accepts feedback for at most this long. None: no limit."""

    @property
    def retention_s(self) -> float | None:
        return None if self.retention_days is None else self.retention_days * 86_400.0

    def resolved_path(self, data_dir: str | os.PathLike) -> Path:
        return Path(self.path).expanduser() if self.path else Path(data_dir).expanduser() / "querylog"


@dataclass(frozen=True)
class QueryRecord:
    """What happened to one request."""

    request_id: str
    router: str
    """Router that scored the request ("knn", "classifier", ...), or "none" when the client named a tier."""
    tier: str
    """Tier that produced the returned answer."""
    score: float | None = None
    """Router difficulty score in [0, 1]."""
    threshold: float | None = None
    """Threshold the score was compared with."""
    tier_chain: tuple[str, ...] = ()
    """Tiers tried in order; more than one means the cascade escalated."""
    escalated: bool = False
    confidences: tuple[float, ...] = ()
    """Cascade confidence of each scored answer, in `tier_chain` order (the top tier's is not scored)."""
    cascade_thresholds: tuple[float, ...] = ()
    """Threshold each confidence was compared with (same order): answer i escalated iff confidences[i] <
    cascade_thresholds[i], barring a format failure or a full tier above."""
    latency_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: Status = "ok"
    prompt: str | None = None
    """Routed text; kept only when `store_prompts` is on."""
    label: float | None = None
    """Optional difficulty label in [0, 1] (from feedback or offline grading) for `train-router`."""
    routed_tier: str | None = None
    """The tier the live router chose (before load moved it, or exploration tried the cheapest tier)."""
    explored: bool = False
    """The router chose a higher tier and exploration tried the cheapest one first (`router.learn`)."""
    shadow_router: str | None = None
    """The candidate router of `router.shadow` (e.g. `version:3`), when it decided this request."""
    shadow_tier: str | None = None
    """The tier the candidate would have chosen."""
    shadow_score: float | None = None
    """The candidate's difficulty score."""
    timestamp: float = field(default_factory=time.time)
    """Unix seconds when the request finished."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    def cascade_decisions(self) -> list[CascadeDecisionRecord]:
        """One entry per scored answer: the tier, its confidence, the threshold and whether it escalated."""
        out = []
        for i, confidence in enumerate(self.confidences):
            if i >= len(self.tier_chain):
                break
            threshold = self.cascade_thresholds[i] if i < len(self.cascade_thresholds) else None
            out.append(CascadeDecisionRecord(self.tier_chain[i], confidence, threshold, i < len(self.tier_chain) - 1))
        return out

    @staticmethod
    def from_dict(data: dict) -> QueryRecord:
        known = {f.name for f in fields(QueryRecord)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("tier_chain", "confidences", "cascade_thresholds"):
            values[name] = tuple(values.get(name) or ())
        return QueryRecord(**values)


@dataclass(frozen=True)
class CascadeDecisionRecord:
    """One cascade decision read back from a `QueryRecord`."""

    tier: str
    confidence: float
    threshold: float | None
    """None in records written before thresholds were logged."""
    escalated: bool


def status_word(status: int) -> Status:
    """An HTTP status as the record's `status`."""
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    if status == 499:
        return "cancelled"
    return "error"


def _day_file(directory: Path, ts: float) -> Path:
    return directory / f"querylog-{datetime.fromtimestamp(ts, UTC):%Y%m%d}.jsonl"


class QueryLog:
    """Append-only JSONL query log. Thread-safe; `append` never blocks on disk."""

    def __init__(self, directory: str | os.PathLike, *, store_prompts: bool = False,
                 max_queue: int = 10_000, flush_interval_s: float = 0.5) -> None:
        self.directory = Path(directory)
        self.store_prompts = store_prompts
        self._queue: queue.Queue[QueryRecord | None] = queue.Queue(maxsize=max_queue)
        self._flush_interval_s = flush_interval_s
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self.dropped = 0
        """Records dropped because the queue was full."""

    @classmethod
    def from_config(cls, cfg: QueryLogConfig, data_dir: str | os.PathLike) -> QueryLog:
        return cls(cfg.resolved_path(data_dir), store_prompts=cfg.store_prompts,
                   max_queue=cfg.max_queue, flush_interval_s=cfg.flush_interval_s)

    def append(self, record: QueryRecord) -> None:
        """Queue one record for writing; drops it (and counts) when the writer is far behind."""
        if not self.store_prompts and record.prompt is not None:
            record = replace(record, prompt=None)
        with self._lock:
            if self._writer is None:
                self._start()
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    logger.warning("query log queue full; %d records dropped so far", self.dropped)
                return
            self._pending += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued record is on disk; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._idle.wait(left):
                    return self._pending == 0
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush and stop the writer thread."""
        self.flush(timeout)
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout)

    def read(self, since: float | datetime | None = None, until: float | datetime | None = None) -> list[QueryRecord]:
        """Records with `since <= timestamp < until`, oldest first (see `read_records`)."""
        return list(read_records(self.directory, since=since, until=until))

    def _start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = threading.Thread(target=self._run, name="tierserve-querylog", daemon=True)
        self._writer.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=self._flush_interval_s)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            records = [r for r in batch if r is not None]
            try:
                self._write(records)
            except OSError:
                logger.exception("query log write to %s failed; %d records lost", self.directory, len(records))
            with self._idle:
                self._pending -= len(records)
                self._idle.notify_all()

    def _write(self, records: list[QueryRecord]) -> None:
        by_file: dict[Path, list[str]] = {}
        for r in records:
            by_file.setdefault(_day_file(self.directory, r.timestamp), []).append(r.to_json() + "\n")
        for path, lines in by_file.items():
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)


def _seconds(value: float | datetime | None, default: float) -> float:
    if value is None:
        return default
    return value.timestamp() if isinstance(value, datetime) else float(value)


def read_records(
    directory: str | os.PathLike, *, since: float | datetime | None = None, until: float | datetime | None = None
) -> Iterator[QueryRecord]:
    """Records from the log folder in time order; skips (and logs) lines that do not parse, e.g. a torn
    last line after a crash."""
    directory = Path(directory)
    lo, hi = _seconds(since, float("-inf")), _seconds(until, float("inf"))
    first_day = _day_file(directory, lo).name if lo != float("-inf") else ""
    bad = 0
    records: list[QueryRecord] = []
    for path in sorted(directory.glob("querylog-*.jsonl")):
        if path.name < first_day:
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = QueryRecord.from_dict(json.loads(line))
                except (ValueError, TypeError):
                    bad += 1
                    continue
                if lo <= record.timestamp < hi:
                    records.append(record)
    if bad:
        logger.warning("query log %s: skipped %d unreadable lines", directory, bad)
    records.sort(key=lambda r: r.timestamp)
    yield from records
