"""The quality table's verdict: the static embedder may need at most one point more strong calls than its teacher."""

from __future__ import annotations

from benchmarks.embedder_quality import QUANTILES, QuantileTrial, Row, choose_quantile, render


def row(dataset: str, teacher: float, static: float) -> Row:
    return Row(dataset, 100, 100, "minilm:model", teacher, (teacher - 5, teacher + 5), static,
               (static - 5, static + 5), 0.66, 0.65)


def test_within_one_point_qualifies_and_fewer_strong_calls_too():
    assert row("mmlu", 30.4, 31.4).qualifies
    assert row("mmlu", 30.4, 25.0).qualifies
    assert not row("mmlu", 30.4, 31.5).qualifies


def test_the_verdict_names_the_sets_that_fail():
    text = render([row("mmlu", 30.4, 30.9), row("gsm8k", 34.2, 37.0)], [], limit=None, seconds=1)
    assert "| gsm8k | 100 / 100 | minilm:model | 34.2% [29.2, 39.2] | 37.0% [32.0, 42.0] | +2.8 |" in text
    assert "**no**" in text and "does not qualify (gsm8k lose more than 1 point)" in text
    assert "Smoke run" not in text
    good = render([row("mmlu", 30.4, 30.9)], [], limit=None, seconds=1)
    assert "qualifies on every set" in good


def test_the_margin_quantile_is_the_smallest_within_one_point_on_every_set():
    def trials(name: str, losses: dict[float, float]) -> list[QuantileTrial]:
        return [QuantileTrial(name, q, losses.get(q, 0.0), 10.0 * (len(QUANTILES) - i))
                for i, q in enumerate(QUANTILES)]

    calm = trials("mmlu", {0.9: 0.6})
    assert choose_quantile(calm) == 0.9
    noisy = trials("mt-bench", {0.9: 4.9, 0.95: 4.9, 0.975: 1.1, 0.99: 4.9})  # one set decides for all
    assert choose_quantile(calm + noisy) == 0.995
    assert choose_quantile(trials("mbpp", {q: 2.0 for q in QUANTILES})) == 1.0  # none is: the largest error
    text = render([row("mmlu", 30.4, 30.9)], calm + noisy, limit=None, seconds=1)
    assert "| mt-bench | +4.9 (60%) | +4.9 (50%) | +1.1 (40%) | +4.9 (30%) | +0.0 (20%) | +0.0 (10%) |" in text
    assert "- Picked: q=0.995 (" in text
