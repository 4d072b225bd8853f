"""Confidence methods against hand-computed values."""

from __future__ import annotations

import math

import pytest

from serving.cascade.confidence import (
    answer_key,
    consistency_confidence,
    format_ok,
    logprob_confidence,
    modal_answer,
    verify_confidence,
    verify_prompt,
)
from serving.cascade.config import FormatValidator
from serving.types import TokenLogprob


def lps(*values: float) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(token=f"t{i}", logprob=v) for i, v in enumerate(values))


class TestLogprobConfidence:
    def test_mean_is_exp_of_mean_logprob(self):
        assert logprob_confidence(lps(-0.1, -0.2, -0.3)) == pytest.approx(math.exp(-0.2))

    def test_accepts_plain_floats(self):
        assert logprob_confidence([-0.1, -0.2, -0.3]) == pytest.approx(math.exp(-0.2))

    def test_min_is_weakest_token(self):
        assert logprob_confidence(lps(-0.1, -2.0, -0.3), aggregate="min") == pytest.approx(math.exp(-2.0))

    def test_tail_averages_the_weakest_fraction(self):
        # 8 tokens, q = 0.25 -> the 2 weakest: -3 and -2.
        values = lps(-0.1, -3.0, -0.2, -0.1, -2.0, -0.5, -0.1, -0.4)
        assert logprob_confidence(values, aggregate="tail", tail_fraction=0.25) == pytest.approx(math.exp(-2.5))

    def test_tail_rounds_up_and_takes_at_least_one(self):
        # 3 tokens * 0.25 = 0.75 -> 1 token (the weakest).
        assert logprob_confidence(lps(-0.1, -1.0, -0.2), aggregate="tail") == pytest.approx(math.exp(-1.0))
        # 5 tokens * 0.5 = 2.5 -> 3 tokens: -1.0, -0.6, -0.5.
        got = logprob_confidence(lps(-0.1, -1.0, -0.5, -0.6, -0.2), aggregate="tail", tail_fraction=0.5)
        assert got == pytest.approx(math.exp(-0.7))

    def test_tail_float_product_does_not_round_up_spuriously(self):
        # 0.28 * 25 is 7.000000000000001 in floats; exactly 7 tokens must be used, not 8.
        values = [-1.0] * 7 + [-0.5] + [0.0] * 17
        assert logprob_confidence(values, aggregate="tail", tail_fraction=0.28) == pytest.approx(math.exp(-1.0))

    def test_tail_fraction_one_equals_mean(self):
        values = lps(-0.1, -0.7, -0.4)
        assert logprob_confidence(values, aggregate="tail", tail_fraction=1.0) == pytest.approx(
            logprob_confidence(values)
        )

    @pytest.mark.parametrize("aggregate", ["mean", "min", "tail"])
    def test_empty_answer_has_zero_confidence(self, aggregate):
        assert logprob_confidence((), aggregate=aggregate) == 0.0

    def test_minus_infinity_gives_zero(self):
        assert logprob_confidence(lps(-0.1, -math.inf)) == 0.0

    def test_nan_counts_as_impossible_token(self):
        assert logprob_confidence(lps(-0.1, math.nan, -0.1)) == 0.0
        assert logprob_confidence(lps(-0.1, math.nan), aggregate="min") == 0.0

    def test_positive_logprob_is_clamped_to_certainty(self):
        assert logprob_confidence(lps(0.5, -0.4)) == pytest.approx(math.exp(-0.2))

    def test_all_certain_tokens_give_one(self):
        assert logprob_confidence(lps(0.0, 0.0)) == 1.0

    def test_bad_options_are_rejected(self):
        with pytest.raises(ValueError, match="tail_fraction"):
            logprob_confidence(lps(-0.1), aggregate="tail", tail_fraction=0.0)
        with pytest.raises(ValueError, match="aggregate 'median'"):
            logprob_confidence(lps(-0.1), aggregate="median")  # type: ignore[arg-type]


class TestConsistency:
    def test_agreement_ratio_of_the_modal_answer(self):
        assert consistency_confidence(["Paris", "paris.", " PARIS ", "Lyon", "Paris!"]) == pytest.approx(4 / 5)

    def test_numeric_answers_compare_the_final_number(self):
        answers = ["The answer is 1,000.", "1000", "So 3 + 997 = 1000.0", "It is 999"]
        assert consistency_confidence(answers) == pytest.approx(3 / 4)

    def test_negative_numbers_and_ranges(self):
        assert answer_key("x = -5") == answer_key("-5.0")
        assert answer_key("pages 3-4") == answer_key("4")

    def test_text_normalization_ignores_numbers_rule(self):
        assert consistency_confidence(["answer 1", "answer 2"], normalize="text") == pytest.approx(1 / 2)
        assert answer_key("Hello,   World!", "text") == "hello world"

    def test_exact_only_strips_surrounding_whitespace(self):
        assert consistency_confidence(["Paris", " Paris\n", "paris"], normalize="exact") == pytest.approx(2 / 3)

    def test_all_disagree(self):
        assert consistency_confidence(["a", "b", "c", "d"]) == pytest.approx(1 / 4)

    def test_empty_answers_never_agree(self):
        assert consistency_confidence(["", "  ", "x"]) == pytest.approx(1 / 3)
        assert consistency_confidence(["", "..."]) == 0.0
        assert consistency_confidence([]) == 0.0

    def test_modal_answer_index_and_tie_goes_to_first(self):
        assert modal_answer(["b", "a", "a", "b", "c"]) == (0, pytest.approx(2 / 5))
        assert modal_answer(["c", "a", "a"]) == (1, pytest.approx(2 / 3))
        assert modal_answer(["", ""]) == (-1, 0.0)


class TestVerify:
    def test_yes_mass_normalized_over_yes_and_no(self):
        top = [(" Yes", math.log(0.6)), (" No", math.log(0.2)), (" Maybe", math.log(0.2))]
        assert verify_confidence(top) == pytest.approx(0.75)

    def test_case_and_space_variants_add_up(self):
        top = [(" Yes", math.log(0.3)), ("yes", math.log(0.2)), ("YES", math.log(0.1)), ("no", math.log(0.4))]
        assert verify_confidence(top) == pytest.approx(0.6)

    def test_tokenizer_space_markers_and_punctuation(self):
        top = [("Ġyes", math.log(0.1)), ("▁No", math.log(0.3)), ("No.", math.log(0.1))]
        assert verify_confidence(top) == pytest.approx(0.2)

    def test_neither_yes_nor_no(self):
        assert verify_confidence([("Maybe", -0.1), ("The", -2.0)]) == 0.5
        assert verify_confidence([]) == 0.5

    def test_duplicate_token_counts_once(self):
        top = [(" Yes", math.log(0.5)), (" Yes", math.log(0.5)), (" No", math.log(0.5))]
        assert verify_confidence(top) == pytest.approx(0.5)

    def test_nan_is_ignored_and_minus_inf_has_no_mass(self):
        assert verify_confidence([("Yes", math.nan), ("No", math.log(0.1))]) == 0.0
        assert verify_confidence([("Yes", -math.inf), ("No", -math.inf)]) == 0.5

    def test_custom_tokens(self):
        top = [("oui", math.log(0.3)), ("non", math.log(0.1))]
        assert verify_confidence(top, yes_tokens=["Oui"], no_tokens=["non"]) == pytest.approx(0.75)

    def test_prompt_fills_both_placeholders_and_keeps_braces(self):
        prompt = verify_prompt(" What is {x}? ", "x = {answer}", "Q: {question}\nA: {answer}\nOK?")
        assert prompt == "Q: What is {x}?\nA: x = {answer}\nOK?"

    def test_default_prompt_asks_yes_or_no(self):
        prompt = verify_prompt("2+2?", "4")
        assert "2+2?" in prompt and "4" in prompt and "Yes or No" in prompt


class TestFormat:
    schema = FormatValidator(
        json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )

    def test_json_schema_pass_and_fail(self):
        assert format_ok(' {"n": 3}\n', self.schema)
        assert not format_ok('{"n": "3"}', self.schema)
        assert not format_ok("{}", self.schema)

    def test_invalid_json_and_fenced_json_fail(self):
        assert not format_ok('{"n": 3', self.schema)
        assert not format_ok('```json\n{"n": 3}\n```', self.schema)

    def test_regex_must_match_in_full(self):
        validator = FormatValidator(regex=r"[A-D]")
        assert format_ok(" B\n", validator)
        assert not format_ok("B because", validator)
        assert not format_ok("", validator)

    def test_no_validator_passes(self):
        assert format_ok("anything", None)


def test_yes_no_tokens_are_read_in_every_tokenizer_spelling():
    from serving.cascade.confidence import has_yes_no

    for token in (" Yes", "\u0120Yes", "\u2581yes", "NO.", "no"):
        assert has_yes_no([(token, -0.1)], yes_tokens=["yes"], no_tokens=["no"]), token
    assert not has_yes_no([("\u0120Maybe", -0.1), ("yesterday", -2.0)], yes_tokens=["yes"], no_tokens=["no"])
