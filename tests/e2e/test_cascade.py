"""Cascades on the real engines: confidence from the small tier's logprobs decides escalation."""

from __future__ import annotations

import math

import openai
import pytest

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "Extract the date: the meeting is on 3 May."}]


def _cascade(threshold: float, method: str | None = None) -> dict:
    opts = {"cascade": True, "cascade_threshold": threshold}
    if method:
        opts["cascade_method"] = method
    return {"tierserve": opts}


def test_threshold_below_every_confidence_keeps_the_small_answer(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=MSG, max_tokens=8, temperature=0, logprobs=True, extra_body=_cascade(0.0)
    )
    r = raw.parse()
    meta = r.model_extra["tierserve"]
    assert meta["tier_chain"] == ["small"] and meta["escalated"] is False
    assert raw.headers["x-tierserve-escalated"] == "false"
    # The confidence is the geometric-mean token probability of the returned answer's logprobs.
    lps = [t.logprob for t in r.choices[0].logprobs.content]
    assert meta["confidences"][0] == pytest.approx(math.exp(sum(lps) / len(lps)), rel=1e-3)
    assert 0.0 < meta["confidences"][0] < 1.0


def test_threshold_above_every_confidence_escalates(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=MSG, max_tokens=8, temperature=0, extra_body=_cascade(1.0)
    )
    r = raw.parse()
    meta = r.model_extra["tierserve"]
    assert meta["tier_chain"] == ["small", "large"] and meta["escalated"] is True
    assert raw.headers["x-tierserve-tier"] == "large"
    assert raw.headers["x-tierserve-tier-chain"] == "small,large"
    assert meta["wasted_tokens"]["small"] > 0
    large = client.chat.completions.create(model="large", messages=MSG, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == large.choices[0].message.content
    assert r.choices[0].logprobs is None  # the cascade needed logprobs; the client did not ask for them


@pytest.mark.parametrize("method", ["verify", "consistency"])
def test_other_confidence_methods_run_their_extra_calls(client: openai.OpenAI, method: str) -> None:
    r = client.chat.completions.create(model="small", messages=MSG, max_tokens=6, extra_body=_cascade(1.0, method))
    meta = r.model_extra["tierserve"]
    assert meta["tier_chain"] == ["small", "large"]
    assert 0.0 <= meta["confidences"][0] <= 1.0
    # Scoring calls (verification prompt, extra samples) count as wasted small-tier tokens.
    assert meta["wasted_tokens"]["small"] > r.usage.prompt_tokens


@pytest.mark.parametrize(("threshold", "answering"), [(0.0, "small"), (1.0, "large")])
def test_streaming_cascade_is_valid_sse_and_leaks_no_cheap_token(
    client: openai.OpenAI, threshold: float, answering: str
) -> None:
    kwargs = dict(messages=MSG, max_tokens=24, temperature=0)
    chunks = list(
        client.chat.completions.create(model="small", stream=True, extra_body=_cascade(threshold),
                                       stream_options={"include_usage": True}, **kwargs)
    )
    metas = [c.model_extra["tierserve"] for c in chunks if "tierserve" in c.model_extra]
    assert len(metas) >= 2 and "tierserve" in chunks[0].model_extra and "tierserve" in chunks[-1].model_extra
    assert {m["tier"] for m in metas} == {answering}
    assert metas[0]["escalated"] is (answering == "large")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = client.chat.completions.create(model=answering, **kwargs).choices[0].message.content
    assert text == expected  # escalated: every streamed token is the large tier's
    assert chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_cascade_can_be_requested_on_auto_and_reported_in_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Convert 'forty two' to digits."}],
        max_tokens=4, extra_body=_cascade(1.0),
    )
    assert raw.headers["x-tierserve-escalated"] == "true"
    assert raw.headers["x-tierserve-confidences"]
