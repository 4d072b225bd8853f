"""OpenAI response shapes built from typed results: whole bodies and server-sent-event chunks.

Used where the tokens are: the tier replica encodes a plain stream's SSE events itself (the ingress only
forwards the bytes), and the ingress encodes the streams it has to look into (cascades). One encoder,
so both paths send identical bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from serving.types import GenerationChunk, GenerationResult, TokenLogprob

Kind = Literal["chat", "completion"]


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(lps: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": _bytes(lp.token),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in lp.top],
            }
            for lp in lps
        ]
    }


def completion_logprobs(lps: tuple[TokenLogprob, ...], text_offset0: int = 0) -> dict[str, Any]:
    offsets, pos = [], text_offset0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [dict(lp.top) for lp in lps],
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    kind: Kind, request_id: str, model: str, result: GenerationResult, logprobs: bool, meta: dict[str, Any]
) -> dict[str, Any]:
    """A whole chat.completion or text_completion body, with the `tierserve` decision object."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "message": {"role": "assistant", "content": result.text},
            "logprobs": chat_logprobs(result.token_logprobs) if logprobs else None,
        }
    else:
        choice = {
            "text": result.text,
            "logprobs": completion_logprobs(result.token_logprobs) if logprobs else None,
        }
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, **choice, "finish_reason": result.finish_reason}],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "tierserve": meta,
    }


# ---- streaming ----------------------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":")).encode


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else _dumps(payload)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class ChunkEncoder:
    """Turns one request's typed chunks into its SSE events, in OpenAI's chunk shapes.

    The `tierserve` object rides on the first and the last chunk only (the response headers carry it
    from the start); every other event is built from a prefix fixed per request plus the JSON-escaped
    delta, the per-token cost of a stream.
    """

    def __init__(
        self, *, kind: Kind, request_id: str, model: str, logprobs: bool, include_usage: bool,
        created: int | None = None,
    ) -> None:
        self.kind = kind
        self.request_id = request_id
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = created if created is not None else int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head = f'data: {{"id":{_dumps(request_id)},"object":"{obj}","created":{self.created},"model":{_dumps(model)}'
        self._usage_null = ',"usage":null' if include_usage else ""
        self._sent_first = False
        self._text_offset = 0

    def encode(self, chunk: GenerationChunk, meta: dict[str, Any] | None = None) -> bytes:
        """One event; `meta` (the tierserve object) is included when given."""
        first = not self._sent_first
        self._sent_first = True
        tail = f',"tierserve":{_dumps(meta)}' if meta is not None else ""
        finish = "null" if chunk.finish_reason is None else f'"{chunk.finish_reason}"'
        if self.logprobs:
            logprobs = _dumps(
                chat_logprobs(chunk.token_logprobs)
                if self.kind == "chat"
                else completion_logprobs(chunk.token_logprobs, self._text_offset)
            )
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

    def usage_chunk(self, last: GenerationChunk, meta: dict[str, Any] | None = None) -> bytes:
        tail = f',"tierserve":{_dumps(meta)}' if meta is not None else ""
        body = _dumps(usage(last.prompt_tokens, last.completion_tokens))
        return f'{self._head}{tail},"choices":[],"usage":{body}}}\n\n'.encode()


async def encode_stream(
    chunks: AsyncIterator[GenerationChunk], encoder: ChunkEncoder, meta: Callable[[], dict[str, Any]]
) -> AsyncIterator[bytes]:
    """Encode a chunk stream, then the usage chunk (if asked) and [DONE].

    `meta()` is called for the first and the last chunk, so the last one carries the final decision
    (a cascade's trace is complete only then).
    """
    last: GenerationChunk | None = None
    async for chunk in chunks:
        first = last is None
        last = chunk
        yield encoder.encode(chunk, meta() if first or chunk.finish_reason is not None else None)
    if last is not None and encoder.include_usage:
        yield encoder.usage_chunk(last, meta())
    yield DONE
