"""Multi-turn conversations on the live stack keep the tier that answered them (one ingress replica)."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.e2e.test_routing import HARD, ROUTINE

pytestmark = pytest.mark.e2e
ESCALATE = {"tierserve": {"cascade": True, "cascade_threshold": 1.0}}  # every small answer escalates


def _chat(client: openai.OpenAI, messages: list[dict], user: str, model: str = "auto", **kw: object) -> dict:
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, user=user, **kw)
    return r.model_extra["tierserve"]


def _later(opening: str, follow_up: str) -> list[dict]:
    return [{"role": "user", "content": opening}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": follow_up}]


def test_an_escalated_conversation_stays_on_large_for_a_routine_follow_up(client: openai.OpenAI) -> None:
    user = uuid.uuid4().hex  # a fresh session on every run (the user field is part of the derived key)
    first = _chat(client, [{"role": "user", "content": ROUTINE[0]}], user, extra_body=ESCALATE)
    assert first["routed_tier"] == "small" and first["tier_chain"] == ["small", "large"]
    follow = _chat(client, _later(ROUTINE[0], ROUTINE[1]), user)
    assert follow["router"] == "session" and follow["tier"] == "large", follow["reason"]
    assert "stays on large" in follow["reason"]
    other_user = _chat(client, _later(ROUTINE[0], ROUTINE[1]), uuid.uuid4().hex)
    assert other_user["router"] != "session" and other_user["tier"] == "small"


def test_a_hard_opening_keeps_large_and_a_named_tier_still_wins(client: openai.OpenAI) -> None:
    user = uuid.uuid4().hex
    assert _chat(client, [{"role": "user", "content": HARD[0]}], user)["tier"] == "large"
    assert _chat(client, _later(HARD[0], ROUTINE[2]), user)["router"] == "session"
    named = _chat(client, _later(HARD[0], ROUTINE[2]), user, model="small")
    assert named["router"] == "explicit" and named["tier"] == "small"


def test_the_session_header_keys_a_conversation(client: openai.OpenAI) -> None:
    header = {"x-tierserve-session": uuid.uuid4().hex}
    first = client.completions.create(model="auto", prompt=HARD[1], max_tokens=4, extra_headers=header)
    assert first.model_extra["tierserve"]["tier"] == "large"
    later = client.completions.create(model="auto", prompt=ROUTINE[2], max_tokens=4, extra_headers=header)
    assert later.model_extra["tierserve"]["router"] == "session" and later.model_extra["tierserve"]["tier"] == "large"
