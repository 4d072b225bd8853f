"""OpenAI response shapes: the SSE encoder's events parse as the openai SDK's own types."""

from __future__ import annotations

import json

from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from serving.ingress.openai import DONE, SseEncoder
from serving.types import GenerationChunk, TokenLogprob


def _chunk(text: str, n: int, finish: str | None = None, lp: float | None = None) -> GenerationChunk:
    logprobs = (TokenLogprob(text, lp, ((text, lp), ("x", lp - 1))),) if lp is not None else ()
    return GenerationChunk(text=text, token_logprobs=logprobs, num_new_tokens=1, finish_reason=finish,
                           prompt_tokens=3, completion_tokens=n)


def _events(data: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in data.decode().split("\n\n") if e]


def test_chat_stream_escapes_text_and_carries_meta_only_on_the_edges() -> None:
    encoder = SseEncoder(kind="chat", request_id="c1", model="auto", logprobs=False, include_usage=True)
    data = (encoder.batch([_chunk('a "quoted"\n', 1), _chunk("é☃", 2)], {"tier": "small", "n": 1})
            + encoder.batch([_chunk("end", 3, "stop")], {"tier": "small", "n": 2})
            + encoder.tail(3, 3, {"tier": "small", "n": 3}))
    events = _events(data)
    assert events[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert "".join(p.choices[0].delta.content for p in parsed if p.choices) == 'a "quoted"\né☃end'
    assert [p.model_extra.get("tierserve", {}).get("n") for p in parsed] == [1, None, 2, 3]  # the final decision last
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[1].choices[0].delta.role is None
    assert parsed[-1].usage.total_tokens == 6


def test_completion_logprobs_have_running_text_offsets() -> None:
    encoder = SseEncoder(kind="completion", request_id="c2", model="small", logprobs=True, include_usage=False)
    first = json.loads(_events(encoder.batch([_chunk("ab", 1, lp=-0.5)], {"tier": "small"}))[0])
    second = json.loads(_events(encoder.batch([_chunk("cde", 2, lp=-1.0)], {"tier": "small"}))[0])
    last = json.loads(_events(encoder.batch([_chunk("f", 3, "length", lp=-0.1)], {"tier": "small"}))[0])
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert second["choices"][0]["logprobs"]["top_logprobs"] == [{"cde": -1.0, "x": -2.0}]
    assert "usage" not in second and "tierserve" not in second  # meta rides only on the first and the last
    assert last["choices"][0]["logprobs"]["text_offset"] == [5] and last["tierserve"] == {"tier": "small"}
    Completion.model_validate({**last, "object": "text_completion"})
    assert DONE == b"data: [DONE]\n\n"
