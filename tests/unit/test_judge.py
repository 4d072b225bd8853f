"""LLM-as-judge mechanics: prompt building, P(hard) from logprobs, the router over a fake small tier."""

from __future__ import annotations

import asyncio
import math

import pytest

from router.judge import JudgeRouter, build_judge_prompt, p_hard


def test_prompt_asks_yes_no_and_embeds_the_request():
    prompt = build_judge_prompt("Prove that sqrt(2) is irrational.")
    assert "Is this request hard? Answer yes or no." in prompt
    assert "Prove that sqrt(2) is irrational." in prompt
    assert prompt.endswith("Answer:")


def test_long_request_keeps_start_and_end():
    text = "A" * 3000 + "THE-END"
    prompt = build_judge_prompt(text, max_chars=100)
    assert "THE-END" in prompt and "[...]" in prompt and len(prompt) < 600


def test_normalizes_over_yes_and_no_mass():
    v = p_hard([(" Yes", math.log(0.6)), (" No", math.log(0.2)), (" Maybe", math.log(0.2))])
    assert v.p_hard == pytest.approx(0.75)
    assert v.answer_mass == pytest.approx(0.8)


def test_spelling_variants_add_up():
    alts = [("yes", math.log(0.3)), (" YES", math.log(0.1)), ("\u2581Yes", math.log(0.1)), ("No.", math.log(0.5))]
    assert p_hard(alts).p_hard == pytest.approx(0.5)
    assert p_hard([("\u0120no", math.log(0.9)), (" Yes", math.log(0.1))]).p_hard == pytest.approx(0.1)


def test_words_that_merely_start_with_yes_or_no_do_not_count():
    v = p_hard([("Not", math.log(0.5)), ("Yesterday", math.log(0.4)), ("None", -1.0)], fallback=0.3)
    assert v.p_hard == 0.3 and v.answer_mass == 0.0


def test_router_uses_the_small_tier_and_falls_back_on_errors():
    seen: list[str] = []

    async def complete(prompt: str):
        seen.append(prompt)
        if "boom" in prompt:
            raise RuntimeError("engine down")
        return [(" yes", math.log(0.9)), (" no", math.log(0.1))]

    router = JudgeRouter(complete, fallback=0.4)
    assert asyncio.run(router.score("hard thing")) == pytest.approx(0.9)
    assert "hard thing" in seen[0]
    scores = asyncio.run(router.score_many(["a", "boom", "c"], concurrency=2))
    assert scores.tolist() == pytest.approx([0.9, 0.4, 0.9])
    assert asyncio.run(router.verdict("a")).answered
    failed = asyncio.run(router.verdict("boom"))
    assert not failed.answered and failed.p_hard == 0.4


def test_a_repeated_token_counts_once_and_missing_logprobs_are_skipped():
    alternatives = [(" Yes", math.log(0.6)), (" Yes", math.log(0.6)), ("no", math.log(0.2)), ("NO", None)]
    assert p_hard(alternatives).p_hard == pytest.approx(0.75)


def test_fallback_must_be_a_probability():
    async def complete(prompt: str):
        return []

    with pytest.raises(ValueError, match="fallback"):
        JudgeRouter(complete, fallback=1.5)


def test_eval_judge_over_an_openai_completions_endpoint():
    import httpx

    from router.eval.routers import JudgeEvalRouter, openai_complete

    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        top = {" Yes": math.log(0.3), " No": math.log(0.6), " Maybe": math.log(0.1)}
        return httpx.Response(200, json={"choices": [{"text": " No", "logprobs": {"top_logprobs": [top]}}]})

    complete = openai_complete("http://small:8000/", "small", transport=httpx.MockTransport(handler))
    scores = JudgeEvalRouter(complete).score(["What is 2+2?", "Prove Fermat's last theorem."])
    assert scores.values.tolist() == pytest.approx([1 / 3, 1 / 3])
    assert len(bodies) == 2 and b'"max_tokens":1' in bodies[0].replace(b" ", b"")
