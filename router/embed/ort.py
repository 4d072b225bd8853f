"""ONNX Runtime's sessions for the router: the only module that imports onnxruntime, one process-wide pool."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def pooled_session(model: bytes) -> Any:
    """An ONNX Runtime session for a serialized model, on this process's shared pool where there is one."""
    return session(model, _pool_threads or 1)


def session(model: bytes | str, num_threads: int) -> Any:
    """A CPU session for a model (a file path or its bytes) on the shared pool of `num_threads`."""
    import onnxruntime as ort

    return ort.InferenceSession(model, session_options(num_threads), providers=["CPUExecutionProvider"])


_pool_threads: int | None = None
"""Threads of this process's one ONNX Runtime pool (None: not created yet, or per-session pools)."""


def session_options(num_threads: int) -> Any:
    """Sessions share one process-wide ONNX Runtime thread pool of `num_threads`.

    With a pool per session, the int8 copy's pool threads kept spinning while the exact copy re-checked a
    text on its own pool, three busy threads on two cores. One shared pool also ran a single embedding
    faster here (5.2-6 ms against 6.1-7.6 ms). The first embedder's `num_threads` sizes it for the process.
    """
    global _pool_threads
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    options = ort.SessionOptions()
    if _pool_threads is None:
        try:
            _pybind_state.set_global_thread_pool_sizes(num_threads, 1)
            _pool_threads = num_threads
        except RuntimeError as exc:  # the runtime's environment exists already: a pool per session
            logger.info("ONNX Runtime thread pool per session (%s)", exc)
            _pool_threads = 0
    if _pool_threads:
        if num_threads != _pool_threads:
            logger.info("ONNX embedder asks for %d threads; this process's shared pool has %d",
                        num_threads, _pool_threads)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    return options


def pool_threads() -> int | None:
    """Threads of this process's shared pool (0: a pool per session; None: none created yet)."""
    return _pool_threads
