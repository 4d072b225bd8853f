"""Confidence of one answer, as pure functions of what the engine returned.

Each method maps to a probability-like value in [0, 1]; malformed engine values (NaN, an empty
answer) map to low confidence so that a broken cheap answer escalates rather than ships.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from router.judge import token_key, yes_no_mass
from serving.cascade.config import (
    DEFAULT_VERIFY_TEMPLATE,
    AnswerNormalization,
    ConfidenceMethod,
    FormatValidator,
    LogprobAggregate,
)
from serving.types import TokenLogprob

_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NOT_WORD = re.compile(r"[^\w\s]")
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class Confidence:
    """How sure the cascade is of one tier's answer."""

    method: ConfidenceMethod
    value: float
    """In [0, 1]; compared against the tier's threshold."""
    format_passed: bool | None = None
    """Result of the format validator; None when the policy has none."""
    tokens_scored: int = 0
    """Tokens the value was computed from (logprob method), answers compared (consistency)."""


def logprob_confidence(
    token_logprobs: Sequence[TokenLogprob | float],
    *,
    aggregate: LogprobAggregate = "mean",
    tail_fraction: float = 0.25,
) -> float:
    """Probability-scale confidence from per-token logprobs; 0.0 for an empty answer.

    `mean` is the geometric-mean token probability exp(mean logprob); `min` the probability of the
    least likely token; `tail` exp(mean logprob) over the ceil(tail_fraction * n) least likely tokens.
    A NaN logprob counts as -inf (probability 0), a positive one as 0 (probability 1).
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}.")
    values = [_clean_logprob(lp.logprob if isinstance(lp, TokenLogprob) else lp) for lp in token_logprobs]
    if not values:
        return 0.0
    if aggregate == "mean":
        return math.exp(math.fsum(values) / len(values))
    if aggregate == "min":
        return math.exp(min(values))
    if aggregate == "tail":
        # The epsilon keeps 0.28 * 25 == 7.000000000000001 from rounding up to 8 tokens.
        k = max(1, math.ceil(tail_fraction * len(values) - 1e-9))
        weakest = sorted(values)[:k]
        return math.exp(math.fsum(weakest) / k)
    raise ValueError(f"unknown aggregate {aggregate!r}; use 'mean', 'min' or 'tail'.")


def _clean_logprob(value: float) -> float:
    value = float(value)
    if math.isnan(value):
        return -math.inf
    return min(value, 0.0)


def answer_key(answer: str, normalize: AnswerNormalization = "auto") -> str:
    """The form under which two answers count as the same; "" for an answer with no content."""
    if normalize == "exact":
        return answer.strip()
    if normalize == "auto":
        numbers = _NUMBER.findall(answer)
        if numbers:
            return _number_key(numbers[-1])
    elif normalize != "text":
        raise ValueError(f"unknown normalize {normalize!r}; use 'exact', 'text' or 'auto'.")
    return " ".join(_NOT_WORD.sub(" ", answer.lower()).split())


def _number_key(number: str) -> str:
    try:
        value = Decimal(number.replace(",", "")).normalize()
    except InvalidOperation:  # the regex only admits decimals; kept as text if that ever changes
        return number
    return "#" + format(value, "f")


def modal_answer(answers: Sequence[str], *, normalize: AnswerNormalization = "auto") -> tuple[int, float]:
    """(index of the first answer in the largest agreeing group, that group's share of all answers).

    Empty answers never form a group. Ties go to the group whose first answer comes first, so the
    primary answer (index 0) wins a tie. (-1, 0.0) when no answer has content.
    """
    keys = [answer_key(a, normalize) for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return -1, 0.0
    best = max(counts.values())
    index = next(i for i, k in enumerate(keys) if k and counts[k] == best)
    return index, best / len(answers)


def consistency_confidence(answers: Sequence[str], *, normalize: AnswerNormalization = "auto") -> float:
    """Share of answers agreeing with the most common (normalized) answer; 0.0 with no answers."""
    return modal_answer(answers, normalize=normalize)[1]


def verify_confidence(
    top_alternatives: Iterable[tuple[str, float]],
    *,
    yes_tokens: Iterable[str] = ("yes",),
    no_tokens: Iterable[str] = ("no",),
) -> float:
    """P(yes) among yes+no at one position of a verification reply, from its top logprobs.

    Tokens match case-, space- and punctuation-insensitively (" Yes", "YES", "yes."), and every
    matching token adds its probability. 0.5 when neither yes nor no is among the alternatives.
    A token listed twice (the sampled one and again among the top) counts once.
    """
    p_yes, p_no = yes_no_mass(top_alternatives, yes_tokens, no_tokens)
    if p_yes + p_no <= 0.0:
        return 0.5
    return p_yes / (p_yes + p_no)


def has_yes_no(
    top_alternatives: Iterable[tuple[str, float]], *, yes_tokens: Iterable[str], no_tokens: Iterable[str]
) -> bool:
    """Whether any alternative at this position is a yes or a no token (spelled as the judge reads tokens:
    " Yes", "ĠYes" and "▁yes" are all "yes")."""
    keys = {token_key(t) for t in yes_tokens} | {token_key(t) for t in no_tokens}
    return any(token_key(token) in keys for token, _ in top_alternatives)


def verify_prompt(question: str, answer: str, template: str = DEFAULT_VERIFY_TEMPLATE) -> str:
    """The verification prompt; braces inside the question or answer are left as they are."""
    values = {"question": question.strip(), "answer": answer.strip()}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def format_ok(text: str, validator: FormatValidator | None) -> bool:
    """Whether the whole answer passes the validator (True when there is none).

    JSON Schema: the answer, stripped, must parse as JSON and validate (no code fences are removed:
    the client gets exactly what was checked). Regex: the stripped answer must match in full.
    """
    if validator is None:
        return True
    stripped = text.strip()
    if validator.regex is not None:
        return re.fullmatch(validator.regex, stripped) is not None
    from jsonschema import validators

    try:
        document = json.loads(stripped)
    except ValueError:
        return False
    schema = validator.json_schema or {}
    return validators.validator_for(schema)(schema).is_valid(document)
