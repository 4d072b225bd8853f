"""Typed values passed between the ingress, the tier deployments and the decision functions.

Plain frozen dataclasses (picklable across Ray) so nothing outside `serving.engines.vllm` needs vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling knobs tierserve forwards to an engine."""

    max_tokens: int | None = None
    """None: up to the tier's context limit."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    """Return the sampled token's logprob for every generated token."""
    top_logprobs: int = 0
    """Also return this many most likely alternatives per position."""
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One generation on one tier: either a raw prompt or chat messages."""

    request_id: str
    sampling: SamplingOptions
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """The most likely alternatives at this position, (token, logprob), best first."""


@dataclass(frozen=True)
class GenerationChunk:
    """A streamed delta from an engine. The last chunk has `finish_reason` set."""

    text: str
    token_logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token in this delta (empty unless logprobs were requested)."""
    num_new_tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Running total of generated tokens."""


    @staticmethod
    def joined(chunks: list[GenerationChunk]) -> GenerationChunk:
        """Consecutive deltas of one answer as one chunk (its totals are the last chunk's)."""
        if not chunks:
            raise ValueError("no chunks to join")
        last = chunks[-1]
        return GenerationChunk(
            text="".join(c.text for c in chunks),
            token_logprobs=tuple(lp for c in chunks for lp in c.token_logprobs),
            num_new_tokens=sum(c.num_new_tokens for c in chunks),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )


@dataclass(frozen=True)
class GenerationResult:
    """A whole answer, gathered from its chunks."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class EngineLoad:
    """Live load of one tier replica, from vLLM's scheduler stats."""

    tier: str
    running: int
    """Requests being decoded or prefilled now."""
    waiting: int
    """Requests admitted to the engine but not yet scheduled."""
    kv_cache_usage: float
    """Share of KV-cache blocks in use, 0..1."""
    max_num_seqs: int
    ongoing: int = 0
    """Requests inside this replica's handler (includes ones not yet in the engine)."""
    timestamp: float = 0.0
    """time.time() when the engine last reported stats."""


@dataclass(frozen=True)
class ReplicaStatus:
    """What a tier replica reports to the ingress's poller."""

    replica_id: str
    address: str
    """host:port of the replica's data plane (`serving.channel.wire`)."""
    load: EngineLoad
    local_path: str | None = None
    """The same data plane on a node-local Unix socket, for an ingress on the replica's node."""


@dataclass(frozen=True)
class TierInfo:
    """What the ingress needs to know about a tier to validate requests."""

    name: str
    served_model_name: str
    max_model_len: int
    ready: bool = True
