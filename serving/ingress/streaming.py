"""Server-sent events in OpenAI's chunk shapes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serving.ingress.protocol import chat_logprobs, completion_logprobs, usage
from serving.types import GenerationChunk


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


class ChunkEncoder:
    """Turns typed engine chunks into one endpoint's SSE payloads."""

    def __init__(self, *, kind: str, request_id: str, model: str, logprobs: bool, include_usage: bool) -> None:
        self.kind = kind
        self.request_id = request_id
        self.model = model
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = int(time.time())
        self._sent_role = False
        self._text_offset = 0

    def _base(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "tierserve": meta,
        }

    def encode(self, chunk: GenerationChunk, meta: dict[str, Any]) -> bytes:
        body = self._base(meta)
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": chunk.text}
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": chat_logprobs(chunk.token_logprobs) if self.logprobs else None,
                "finish_reason": chunk.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": chunk.text,
                "logprobs": completion_logprobs(chunk.token_logprobs, self._text_offset) if self.logprobs else None,
                "finish_reason": chunk.finish_reason,
            }
            self._text_offset += len(chunk.text)
        body["choices"] = [choice]
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, last: GenerationChunk, meta: dict[str, Any]) -> bytes:
        body = self._base(meta)
        body["choices"] = []
        body["usage"] = usage(last.prompt_tokens, last.completion_tokens)
        return sse(body)


async def encode_stream(
    chunks: AsyncIterator[GenerationChunk], encoder: ChunkEncoder, meta: dict[str, Any]
) -> AsyncIterator[bytes]:
    """Encode a chunk stream, then the usage chunk (if asked) and [DONE]."""
    last: GenerationChunk | None = None
    async for chunk in chunks:
        last = chunk
        yield encoder.encode(chunk, meta)
    if last is not None and encoder.include_usage:
        yield encoder.usage_chunk(last, meta)
    yield DONE
