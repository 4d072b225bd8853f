"""OpenAI's wire format, encoded in one place at the edge: whole bodies, server-sent-event chunks, the
`tierserve` object and headers that say which tier answered and why, and the SSE response itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from fastapi.responses import Response

from serving.ingress.plan import Outcome, router_label
from serving.types import GenerationChunk, GenerationResult, TokenLogprob

Kind = Literal["chat", "completion"]

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{"token": lp.token, "logprob": lp.logprob, "bytes": _bytes(lp.token),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in lp.top]}
                        for lp in lps]}


def completion_logprobs(lps: Sequence[TokenLogprob], text_offset0: int = 0) -> dict[str, Any]:
    offsets, pos = [], text_offset0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [dict(lp.top) for lp in lps], "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tierserve_object(outcome: Outcome) -> dict[str, Any]:
    """The `tierserve` object of every response: the answering tier, the routing decision and the cascade."""
    d, trace = outcome.decision, outcome.trace
    return {
        "tier": outcome.tier, "routed_tier": d.tier, "router": router_label(d), "score": d.score,
        "thresholds": list(d.thresholds), "reason": d.reason, "overhead_ms": round(d.overhead_ms, 3),
        "fallback": d.fallback, "tier_chain": list(outcome.tier_chain),
        "confidences": [round(c, 6) for c in outcome.confidences], "escalated": outcome.escalated,
        "cascade_reason": trace.reason if trace else None, "wasted_tokens": trace.wasted_tokens() if trace else {},
        "capacity": outcome.capacity,
    }


def headers(outcome: Outcome) -> dict[str, str]:
    """The `x-tierserve-*` response headers (the same facts as the `tierserve` object, for clients that
    read headers only)."""
    d = outcome.decision
    router = router_label(d) + ("-fallback" if d.fallback else "")
    h = {"x-tierserve-tier": outcome.tier, "x-tierserve-router": router,
         "x-tierserve-overhead-ms": f"{d.overhead_ms:.3f}", "x-tierserve-tier-chain": ",".join(outcome.tier_chain),
         "x-tierserve-escalated": "true" if outcome.escalated else "false"}
    if d.score is not None:
        h["x-tierserve-score"] = f"{d.score:.4f}"
    if outcome.confidences:
        h["x-tierserve-confidences"] = ",".join(f"{c:.4f}" for c in outcome.confidences)
    if outcome.capacity:
        h["x-tierserve-capacity"] = outcome.capacity
    return h


def response(kind: Kind, request_id: str, model: str, result: GenerationResult, logprobs: bool,
             meta: dict[str, Any]) -> dict[str, Any]:
    """A whole chat.completion or text_completion body, with the `tierserve` object."""
    if kind == "chat":
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": result.text},
                                  "logprobs": chat_logprobs(result.token_logprobs) if logprobs else None}
    else:
        choice = {"text": result.text,
                  "logprobs": completion_logprobs(result.token_logprobs) if logprobs else None}
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, **choice, "finish_reason": result.finish_reason}],
            "usage": usage(result.prompt_tokens, result.completion_tokens), "tierserve": meta}


# ---- streaming ----------------------------------------------------------------------------------


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else _dumps(payload)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class SseEncoder:
    """One request's SSE events in OpenAI's chunk shapes, a batch of chunks at a time.

    The `tierserve` object rides on the first chunk and on the one that finishes the answer (the headers carry
    it from the start); every other event is a prefix fixed per request plus the JSON-escaped delta.
    """

    def __init__(self, *, kind: Kind, request_id: str, model: str, logprobs: bool, include_usage: bool) -> None:
        self.kind = kind
        self.logprobs = logprobs
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = f'data: {{"id":{_dumps(request_id)},"object":"{obj}","created":{int(time.time())},"model":{_dumps(model)}'
        self._usage_null = ',"usage":null' if include_usage else ""
        self._sent_first = False
        self._text_offset = 0

    def batch(self, chunks: Sequence[GenerationChunk], meta: dict[str, Any]) -> bytes:
        """The events of `chunks`, as one write."""
        return b"".join(self._event(c, meta) for c in chunks)

    def tail(self, prompt_tokens: int, completion_tokens: int, meta: dict[str, Any]) -> bytes:
        """The usage chunk (when asked for) and [DONE]."""
        if not self.include_usage:
            return DONE
        body = _dumps(usage(prompt_tokens, completion_tokens))
        return f'{self._head},"tierserve":{_dumps(meta)},"choices":[],"usage":{body}}}\n\n'.encode() + DONE

    def _event(self, chunk: GenerationChunk, meta: dict[str, Any]) -> bytes:
        first = not self._sent_first
        self._sent_first = True
        tail = f',"tierserve":{_dumps(meta)}' if first or chunk.finish_reason is not None else ""
        finish = "null" if chunk.finish_reason is None else f'"{chunk.finish_reason}"'
        if self.logprobs:
            logprobs = _dumps(chat_logprobs(chunk.token_logprobs) if self.kind == "chat"
                              else completion_logprobs(chunk.token_logprobs, self._text_offset))
        else:
            logprobs = "null"
        text = _dumps(chunk.text)
        if self.kind == "chat":
            role = '"role":"assistant",' if first else ""
            choice = f'{{"index":0,"delta":{{{role}"content":{text}}},"logprobs":{logprobs},"finish_reason":{finish}}}'
        else:
            self._text_offset += len(chunk.text)
            choice = f'{{"index":0,"text":{text},"logprobs":{logprobs},"finish_reason":{finish}}}'
        return f'{self._head}{tail},"choices":[{choice}]{self._usage_null}}}\n\n'.encode()


class SseResponse(Response):
    """A text/event-stream response that sends each body item as it comes. A client that goes away cancels
    the request's task (Ray Serve's ingress does), which closes the body and so the tier call."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "Cache-Control": "no-cache"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
