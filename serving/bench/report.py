"""The bench's outputs: results.json, a markdown table of medians and ratios, and a plot."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from serving.bench import cpu
from serving.bench.load import LoadSpec
from serving.bench.sidebyside import BenchReport, Decisions
from serving.plan.cost import TierCost


@dataclass(frozen=True)
class BenchCost:
    """How the bench prices a tier's measured throughput: its GPU share per replica and the replicas serving."""

    tier: TierCost
    replicas: int = 1

    def label(self, tokens_per_s: float) -> str:
        """GPU-seconds (and $) per 1k output tokens at `tokens_per_s` over all replicas, or "n/a (CPU)"."""
        return replace(self.tier, tokens_per_s=tokens_per_s / self.replicas).label()


def _specs(report: BenchReport) -> list[LoadSpec]:
    """The loads in the order they ran (LoadSpec is hashable: dict keys keep first-seen order)."""
    return list(dict.fromkeys(r.spec for r in report.runs))


def _targets(report: BenchReport) -> list[str]:
    return list(dict.fromkeys(r.target for r in report.runs))


def markdown(report: BenchReport, cost: BenchCost | None = None) -> str:
    """Medians over rounds per (load, target); ratios against bare vLLM where it ran; with `cost`, the GPU
    time per 1k output tokens each throughput means (none for the scripted engine: it holds no GPU)."""
    lines = [
        f"Tier `{report.tier}`, vLLM's serving benchmark (random dataset, greedy, ignore_eos); medians of "
        f"{len({r.round for r in report.runs})} alternating round(s).",
        "",
        "| load | path | output tok/s | vs bare | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | vs bare | ITL p50 ms "
        "| failed |" + (" cost per 1k output tok |" if cost else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cost else ""),
    ]
    for spec in _specs(report):
        load = _load_label(spec)
        bare_tps = report.median("bare", spec, "output_tok_s")
        bare_tpot = report.median("bare", spec, "tpot_p50_ms")
        bare_ttft = report.median("bare", spec, "ttft_p50_ms")
        for target in _targets(report):
            tps = report.median(target, spec, "output_tok_s")
            if tps is None:
                continue
            tpot = report.median(target, spec, "tpot_p50_ms")
            ttft = report.median(target, spec, "ttft_p50_ms")
            ratio = f"{tps / bare_tps:.2f}x" if bare_tps and target != "bare" else ""
            if ratio and len(per_round := round_ratios(report, target, spec)) > 1:
                ratio += f" (rounds {min(per_round):.2f}-{max(per_round):.2f}x)"
            tpot_ratio = f"{tpot / bare_tpot:.2f}x" if bare_tpot and tpot and target != "bare" else ""
            if bare_tpot is not None and bare_tpot < 0.1 and spec.stream and target != "bare":
                # Seen at c=1: no per-token figure to compare, so compare when the whole answer had arrived.
                e2el, bare_e2el = (report.median(t, spec, "e2el_p50_ms") for t in (target, "bare"))
                tpot_ratio = f"n/a: bare sent its tokens in one burst; whole answer p50 {e2el / bare_e2el:.2f}x"
            if target != "bare" and bare_ttft is not None and spec.concurrency == 1:
                ratio += f" (TTFT {ttft - bare_ttft:+.1f} ms)"
            lines.append(
                f"| {load} | {target} | {tps:,.0f} | {ratio} | {ttft:.1f} | "
                f"{report.median(target, spec, 'ttft_p99_ms'):.1f} | {tpot:.2f} | {tpot_ratio} | "
                f"{report.median(target, spec, 'itl_p50_ms'):.2f} | {_failed(report, target, spec)} |"
                + (f" {cost.label(tps) if target != 'plumbing' else '-'} |" if cost else "")
            )
    lines += failure_lines(report)
    lines += decision_lines(report)
    lines += shadow_lines(report)
    lines += cpu_lines(report)
    if cost:
        lines += ["", cost_note(report, cost)]
    return "\n".join(lines) + "\n"


def round_ratios(report: BenchReport, target: str, spec: LoadSpec, against: str = "bare") -> list[float]:
    """`target`'s output tok/s over `against`'s, round by round (each round ran both, back to back): the
    spread says how far one invocation's median ratio can be trusted on a machine whose speed drifts."""
    by_round: dict[int, dict[str, float]] = {}
    for r in report.runs:
        if r.spec == spec and r.target in (target, against):
            by_round.setdefault(r.round, {})[r.target] = r.result.output_tok_s
    return [t[target] / t[against] for _, t in sorted(by_round.items()) if t.get(against) and target in t]


def shadow_lines(report: BenchReport) -> list[str]:
    """What `router.shadow` cost (`--shadow`): model="auto" with the candidate on every request over without it,
    on the same stack, round by round."""
    lines = []
    for spec in _specs(report):
        ratios = round_ratios(report, "tierserve-auto-shadow", spec, against="tierserve-auto")
        if ratios:
            lines.append(f"- {_load_label(spec)}: {statistics.median(ratios):.3f}x (rounds "
                         f"{', '.join(f'{r:.3f}' for r in ratios)})")
    if not lines:
        return []
    head = ("Shadow cost: `tierserve-auto-shadow` (the candidate decides every request too) over `tierserve-auto` "
            "(none), output tok/s on the same stack, back to back:")
    return ["", head, "", *lines]


def _load_label(spec: LoadSpec) -> str:
    return f"{spec.input_len}/{spec.output_len} tok, c={spec.concurrency}, {'stream' if spec.stream else 'unary'}"


def decision_lines(report: BenchReport) -> list[str]:
    """`model="auto"`'s routing decision under each load, apart from the throughput it shares the cores with
    (medians over rounds of each run's p50 and p99, from the ingress's overhead histogram)."""
    rows = []
    for spec in _specs(report):
        runs = [r.decisions for r in report.runs if r.spec == spec and r.decisions is not None]
        if runs:
            p50 = statistics.median(d.p50_ms for d in runs)
            p99 = statistics.median(d.p99_ms for d in runs)
            count = sum(d.count for d in runs)
            cached = 100 * sum(d.cached for d in runs) / count if count else 0.0
            rows.append(f"| {_load_label(spec)} | {count} | {_decided_by(runs)} | {cached:.0f}% | {p50:.1f} | "
                        f"{p99:.1f} |")
    if not rows:
        return []
    return ["", 'Routing decision of `model="auto"` (the ingress\'s `tierserve_routing_overhead_seconds`, bucket-'
            "interpolated; with `knn` as the default router, `knn-static` decisions are the static overflow's, kNN on "
            "the static embedder's vectors for what the router could not embed within `router.max_queue_wait_s`, "
            "and `heuristic` decisions are fallbacks (a busy router without that overflow, a timeout); `cached`: answered by the router's decision cache, a text decided "
            "moments ago; every run sends prompts of its own, so those are repeats within the run):", "", "| load | decisions | decided by | cached | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|", *rows]


def cpu_lines(report: BenchReport) -> list[str]:
    """Where the machine's CPU went per 1,000 output tokens, by process role (`serving.bench.cpu`): medians over
    rounds per (load, target), roles that spent under 1 ms per 1k tokens everywhere left out."""
    cells: dict[tuple[LoadSpec, str], dict[str, float]] = {}
    for spec in _specs(report):
        for target in _targets(report):
            runs = [r.cpu_ms_per_1k_tok for r in _runs(report, target, spec) if r.cpu_ms_per_1k_tok]
            if runs:
                roles = {role for run in runs for role in run}
                cells[(spec, target)] = {role: statistics.median(run.get(role, 0.0) for run in runs) for role in roles}
    roles = [role for role in cpu.ROLE_ORDER if any(c.get(role, 0.0) >= 1.0 for c in cells.values())]
    if not roles:
        return []
    rows = []
    for (spec, target), cell in cells.items():
        busy = sum(v for role, v in cell.items() if role != cpu.IDLE)
        rows.append(f"| {_load_label(spec)} | {target} | " + " | ".join(f"{cell.get(role, 0.0):.0f}" for role in roles)
                    + f" | {busy:.0f} |")
    return ["", "Where the CPU went: CPU ms per 1k output tokens, every process on the machine by role (medians over "
            "rounds; `idle`: the cores' unused time; `busy`: all but idle):", "",
            "| load | path | " + " | ".join(roles) + " | busy |", "|---|---|" + "---|" * (len(roles) + 1), *rows]


def _decided_by(runs: list[Decisions]) -> str:
    """Share of the decisions each router took, largest first, e.g. `knn 39%, heuristic 61%`."""
    totals: dict[str, int] = {}
    for d in runs:
        for router, n in d.by_router.items():
            totals[router] = totals.get(router, 0) + n
    counted = sum(totals.values())
    if not counted:
        return "n/a"
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{router} {100 * n / counted:.0f}%" for router, n in ranked)


def cost_note(report: BenchReport, cost: BenchCost) -> str:
    """How the cost column is priced, and the throughput to keep in `cost.output_tokens_per_s`."""
    t = cost.tier
    if t.num_gpus <= 0:
        return f"Cost: {t.tier} is a CPU tier (resources.num_gpus 0): no GPU cost, n/a (CPU)."
    price = f"${t.usd_per_gpu_hour:g} per GPU-hour" if t.usd_per_gpu_hour is not None else "no cost.usd_per_gpu_hour"
    note = (f"Cost: GPU-seconds per 1k output tokens = {t.num_gpus:g} GPU x {cost.replicas} replica(s) x 1000 / "
            f"output tok/s ({price}).")
    measured = [(s.concurrency, report.median("tierserve", s, "output_tok_s")) for s in _specs(report)]
    measured = [(c, tps) for c, tps in measured if tps]
    if measured:
        c, tps = max(measured)
        note += (f" At c={c} tierserve made {tps:,.0f} tok/s: set cost.output_tokens_per_s.{t.tier}: "
                 f"{tps / cost.replicas:.0f} (per replica) for `tierserve eval` and `tierserve report`.")
    return note


def failure_lines(report: BenchReport) -> list[str]:
    """Why requests failed, per load and target, over all rounds (none: no lines)."""
    lines = []
    for spec in _specs(report):
        for target in _targets(report):
            errors: Counter[str] = Counter()
            for run in _runs(report, target, spec):
                errors.update(run.result.errors)
            if errors:
                reasons = "; ".join(f"{count} x `{error}`" for error, count in errors.most_common(3))
                lines.append(f"- {_load_label(spec)}, {target}: {reasons}")
    return ["", "Failed requests:", "", *lines] if lines else []


def _runs(report: BenchReport, target: str, spec: LoadSpec) -> list:
    return [r for r in report.runs if r.target == target and r.spec == spec]


def _failed(report: BenchReport, target: str, spec: LoadSpec) -> str:
    """Failed requests over all rounds, out of those sent (a throughput with failures is not comparable)."""
    runs = _runs(report, target, spec)
    return f"{sum(r.result.failed for r in runs)}/{sum(r.result.completed + r.result.failed for r in runs)}"


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [s for s in _specs(report) if s.concurrency > 1]
    targets = _targets(report)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(specs)), 4))
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        values = [report.median(target, s, "output_tok_s") or 0 for s in specs]
        ax.bar([x + i * width for x in range(len(specs))], values, width, label=target)
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(specs))])
    ax.set_xticklabels([f"c={s.concurrency}\n{'stream' if s.stream else 'unary'}" for s in specs])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title(f"tierserve vs bare vLLM, tier {report.tier}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: BenchReport, out: Path, cost: BenchCost | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.to_json(), indent=1))
    table = markdown(report, cost)
    (out / "results.md").write_text(table)
    plot(report, out / "throughput.png")
    return table
