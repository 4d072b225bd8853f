"""What a shadow router would have done, from the query log (`tierserve report`'s shadow section).

Each logged request the candidate decided carries both decisions. Agreement is the share where they chose the
same tier. Cost and quality are estimated from the logged cascade outcomes, per request, in units of one call
of the top tier (a cheaper call costs `ratio`):
- both chose the same tier: what happened;
- the candidate sends to the top tier a request the live router cascaded: one top call; its answer is the top
  tier's (an accepted cheap answer would have been replaced, an escalated one was the top tier's anyway);
- the candidate cascades a request the live router sent up: a cheap call, plus a top call with the
  probability that the cheap answer escalates, taken from the request itself where exploration tried the
  cheap tier, else from the escalation rate of the live cascade over the window.
Quality without labels is the share of answers that came from the top tier or from a cheap answer the cascade
accepted (every cascaded answer, by construction) less the share of cheap answers that would have been kept
where the live router chose the top tier ("unjudged": the cascade would judge them, so this is an upper
bound of what pre-routing changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serving.querylog.log import QueryRecord


@dataclass(frozen=True)
class ShadowSummary:
    candidate: str
    requests: int
    agreement: float
    live_cost: float
    shadow_cost: float
    """Mean estimated cost per request, one top-tier call = 1."""
    live_top_share: float
    shadow_top_share: float
    """Share of requests answered by the top tier (live: as logged; shadow: estimated)."""
    escalation_rate: float
    """The live cascade's escalation rate used where a request's own outcome is unknown."""


def summarize_shadow(records: Sequence[QueryRecord], tier_names: Sequence[str], ratio: float) -> list[ShadowSummary]:
    """One summary per candidate in the log (a candidate changes when `router.shadow` changes)."""
    top = tier_names[-1]
    cascaded = [r for r in records if r.confidences and r.tier_chain and r.tier_chain[0] != top]
    esc = sum(r.escalated for r in cascaded) / len(cascaded) if cascaded else 0.0
    out = []
    for candidate in sorted({r.shadow_router for r in records if r.shadow_router}):
        rows = [r for r in records if r.shadow_router == candidate and r.shadow_tier and r.status == "ok"]
        if not rows:
            continue
        agree = live_cost = shadow_cost = live_top = shadow_top = 0.0
        for r in rows:
            live = r.routed_tier or (r.tier_chain[0] if r.tier_chain else r.tier)
            agree += live == r.shadow_tier
            cost = _cost(r.tier_chain or (r.tier,), top, ratio)
            live_cost += cost
            live_top += r.tier == top
            if r.shadow_tier == top:
                shadow_cost += 1.0
                shadow_top += 1.0
            elif live == top and not r.explored:  # the cheap tier was never tried: the live rate stands in
                shadow_cost += ratio + esc
                shadow_top += esc
            else:
                shadow_cost += cost
                shadow_top += r.tier == top
        n = len(rows)
        out.append(ShadowSummary(candidate, n, agree / n, live_cost / n, shadow_cost / n, live_top / n,
                                 shadow_top / n, esc))
    return out


def _cost(chain: Sequence[str], top: str, ratio: float) -> float:
    return sum(1.0 if tier == top else ratio for tier in chain)


def format_shadow(summaries: Sequence[ShadowSummary], ratio: float, basis: str) -> str:
    if not summaries:
        return "shadow: no request in that window was decided by a shadow router (router.shadow)"
    lines = [f"shadow routers (cost per request, one top-tier call = 1, a cheaper call = {ratio:.3g}: {basis})",
             f"  {'candidate':<16}{'requests':>9}{'agree':>8}{'cost live':>11}{'cost cand.':>11}"
             f"{'top live':>10}{'top cand.':>10}"]
    for s in summaries:
        lines.append(f"  {s.candidate:<16}{s.requests:>9}{s.agreement:>8.1%}{s.live_cost:>11.3f}{s.shadow_cost:>11.3f}"
                     f"{s.live_top_share:>10.1%}{s.shadow_top_share:>10.1%}")
    lines.append(f"  (where the candidate cascades what the live router sent up, the live escalation rate "
                 f"{summaries[0].escalation_rate:.1%} stands in for the unknown outcome)")
    return "\n".join(lines)
