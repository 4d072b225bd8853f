"""The query log the ingress writes (one JSON line per request) and `tierserve report` / `calibrate` /
`train-router` read. Reports over it are in `serving.querylog.report` (pandas; imported by the CLIs only)."""

from serving.querylog.log import (
    CascadeDecisionRecord,
    QueryLog,
    QueryLogConfig,
    QueryRecord,
    read_records,
)

__all__ = ["CascadeDecisionRecord", "QueryLog", "QueryLogConfig", "QueryRecord", "read_records"]
