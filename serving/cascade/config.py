"""Cascade section of the YAML config, and the per-request override clients may send.

A cascade lets a cheap tier answer first; a confidence is computed on its answer and, below the
tier's threshold, the same request goes one tier up. Off by default: see `CascadeConfig.enabled`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from router.configbase import StrictModel
from router.judge import token_key

ConfidenceMethod = Literal["logprob", "consistency", "verify"]
LogprobAggregate = Literal["mean", "min", "tail"]
AnswerNormalization = Literal["exact", "text", "auto"]
StreamMode = Literal["prefix", "buffer"]

DEFAULT_VERIFY_TEMPLATE = (
    "Question:\n{question}\n\nProposed answer:\n{answer}\n\n"
    "Is the proposed answer correct and complete? Reply with Yes or No only.\nReply:"
)


class LogprobOptions(StrictModel):
    """How token logprobs of an answer become one confidence."""

    aggregate: LogprobAggregate = "mean"
    """`mean`: geometric-mean token probability, exp(mean logprob). `min`: probability of the weakest
    token. `tail`: exp(mean logprob of the weakest `tail_fraction` of tokens)."""
    tail_fraction: float = Field(default=0.25, gt=0.0, le=1.0)
    """Share of tokens (the least likely ones, at least one) that `tail` averages over."""


class ConsistencyOptions(StrictModel):
    """Self-consistency: sample the cheap tier n times and measure how often the answers agree."""

    n: int = Field(default=5, ge=2, le=32)
    """Answers compared, the returned one included (so n - 1 extra samples)."""
    temperature: float = Field(default=0.7, gt=0.0, le=2.0)
    """Temperature of the extra samples; greedy samples would always agree."""
    normalize: AnswerNormalization = "auto"
    """How answers are compared. `exact`: after stripping surrounding whitespace. `text`: case,
    whitespace and punctuation ignored. `auto`: answers that contain a number are compared by their
    final number (so "The answer is 1,000." equals "1000"), others as `text`."""


class VerifyOptions(StrictModel):
    """Verification: ask the tier that answered whether its answer is right; confidence = P(yes)."""

    prompt_template: str = DEFAULT_VERIFY_TEMPLATE
    """Prompt with the placeholders {question} and {answer}; it should ask for a one-word yes/no reply."""
    yes_tokens: tuple[str, ...] = ("yes",)
    """Tokens counted as yes, compared after stripping whitespace/punctuation and lowercasing."""
    no_tokens: tuple[str, ...] = ("no",)
    """Tokens counted as no, compared the same way."""
    top_logprobs: int = Field(default=10, ge=2, le=20)
    """Alternatives requested per position of the verification reply; more catch both yes and no."""
    max_tokens: int = Field(default=3, ge=1, le=16)
    """Tokens generated for the reply; the first position carrying yes/no mass is used."""

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        missing = [p for p in ("{question}", "{answer}") if p not in value]
        if missing:
            raise ValueError(f"prompt_template lacks {', '.join(missing)}; put both {{question}} and {{answer}} in it.")
        return value

    @model_validator(mode="after")
    def _tokens(self) -> VerifyOptions:
        yes = {token_key(t) for t in self.yes_tokens}
        no = {token_key(t) for t in self.no_tokens}
        if not self.yes_tokens or not self.no_tokens or "" in (yes | no):
            raise ValueError("yes_tokens and no_tokens must each list at least one non-blank token, e.g. ['yes'].")
        if yes & no:
            raise ValueError(f"yes_tokens and no_tokens overlap on {sorted(yes & no)}; a token can only be one.")
        return self


class FormatValidator(StrictModel):
    """A check the whole answer must pass (the "verifiable output" gate); failing it escalates.

    Set exactly one of `json_schema` and `regex`. Combined with any confidence method: an answer
    escalates if it fails the format, whatever its confidence.
    """

    json_schema: dict[str, Any] | None = None
    """The answer, parsed as JSON, must validate against this JSON Schema."""
    regex: str | None = None
    """The answer, with surrounding whitespace stripped, must match this regex in full."""

    @model_validator(mode="after")
    def _one(self) -> FormatValidator:
        if (self.json_schema is None) == (self.regex is None):
            raise ValueError("set exactly one of json_schema and regex.")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile ({exc}); fix the pattern.") from None
        if self.json_schema is not None:
            from jsonschema import validators
            from jsonschema.exceptions import SchemaError

            try:
                validators.validator_for(self.json_schema).check_schema(self.json_schema)
            except SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}; fix the schema.") from None
        return self


class StreamingOptions(StrictModel):
    """How a streamed request is cascaded without faking the stream."""

    mode: StreamMode = "prefix"
    """`prefix`: hold back the first `holdback_tokens` tokens of the cheap tier, decide on them, then
    either stream everything live or escalate before anything was sent. `buffer`: hold the whole
    cheap answer and decide on it (the baseline; same decision as a non-streamed request). Policies
    that need the whole answer (method `consistency`/`verify`, or a `format` validator) always buffer."""
    holdback_tokens: int = Field(default=16, ge=1, le=1024)
    """K: tokens held back and scored in `prefix` mode. An answer shorter than K is decided whole."""


class CascadeConfig(StrictModel):
    """When an answer from a cheap tier is escalated to the next tier up.

    Off by default (`enabled: false`) so that a config without `cascade:` serves every request with
    one call, exactly as routed. With `enabled: true`, requests routed by `model="auto"` cascade;
    requests naming a tier explicitly never do unless they opt in. Any request may opt in or out, or
    change the method or threshold, with the body field `tierserve.cascade` (`CascadeOverride`).
    """

    enabled: bool = False
    """Cascade `model="auto"` requests unless they opt out."""
    method: ConfidenceMethod = "logprob"
    """How the confidence of a cheap answer is measured (per request: `tierserve.cascade.method`)."""
    threshold: float = Field(default=0.80, ge=0.0, le=1.0)
    """Answers with confidence below this escalate. `tierserve calibrate` sets it from data."""
    tier_thresholds: dict[str, float] = {}
    """Per-tier thresholds by tier name, overriding `threshold` for answers from that tier."""
    target_escalation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of scored answers expected to escalate at the calibrated threshold (`tierserve calibrate
    --cascade` writes it). Not used to decide: exported as `tierserve_cascade_escalation_target` so an
    alert can compare it with `tierserve_cascade_decisions_total`, and `tierserve report` shows it."""
    tier_target_escalation_rates: dict[str, float] = {}
    """Per-tier targets by tier name, overriding `target_escalation_rate` for that tier."""
    min_escalation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    """Lowest share of scored answers that must escalate to keep the quality bound `tierserve calibrate
    --cascade --max-quality-loss` calibrated (it writes it). Not used to decide: exported as
    `tierserve_cascade_escalation_floor` so an alert fires when the tier escalates less than the bound needs."""
    tier_min_escalation_rates: dict[str, float] = {}
    """Per-tier floors by tier name, overriding `min_escalation_rate` for that tier."""
    max_escalations: int = Field(default=1, ge=1, le=8)
    """Tiers a request may climb past its entry tier (1: at most two calls)."""
    logprob: LogprobOptions = LogprobOptions()
    consistency: ConsistencyOptions = ConsistencyOptions()
    verify: VerifyOptions = VerifyOptions()
    format: FormatValidator | None = None
    """Optional validator every cheap answer must pass; combinable with any method."""
    streaming: StreamingOptions = StreamingOptions()

    @field_validator("tier_thresholds", "tier_target_escalation_rates", "tier_min_escalation_rates")
    @classmethod
    def _bounded(cls, value: dict[str, float], info) -> dict[str, float]:
        for name, t in value.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"{info.field_name}[{name}] is {t}; use a value between 0 and 1.")
        return value

    def target_rate_for(self, tier: str) -> float | None:
        """The calibrated escalation-rate target of answers from `tier`, None when none is set."""
        return self.tier_target_escalation_rates.get(tier, self.target_escalation_rate)

    def floor_rate_for(self, tier: str) -> float | None:
        """The escalation-rate floor of `tier`'s answers that keeps its calibrated quality bound, None if unset."""
        return self.tier_min_escalation_rates.get(tier, self.min_escalation_rate)

    def check_tiers(self, tier_names: Sequence[str]) -> None:
        """Raise ValueError if a per-tier map names an unknown tier."""
        for field_name in ("tier_thresholds", "tier_target_escalation_rates", "tier_min_escalation_rates"):
            unknown = sorted(set(getattr(self, field_name)) - set(tier_names))
            if unknown:
                raise ValueError(
                    f"cascade.{field_name} names unknown tiers {unknown}; use one of {list(tier_names)}."
                )


class CascadeOverride(StrictModel):
    """Per-request cascade settings, sent as the body field `tierserve.cascade`."""

    enabled: bool | None = None
    """True opts any request (an explicit tier too) in; False opts out; None follows the config."""
    method: ConfidenceMethod | None = None
    """Confidence method for this request; None keeps the configured one."""
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Threshold for every tier of this request; None keeps the configured ones."""
    format: FormatValidator | None = None
    """Validator for this request, replacing the configured one."""
