"""The bench's outputs: results.json, a markdown table of medians and ratios, and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from serving.bench.load import LoadSpec
from serving.bench.sidebyside import BenchReport


def _specs(report: BenchReport) -> list[LoadSpec]:
    """The loads in the order they ran (LoadSpec is hashable: dict keys keep first-seen order)."""
    return list(dict.fromkeys(r.spec for r in report.runs))


def _targets(report: BenchReport) -> list[str]:
    return list(dict.fromkeys(r.target for r in report.runs))


def markdown(report: BenchReport) -> str:
    """Medians over rounds per (load, target); ratios against bare vLLM where it ran."""
    lines = [
        f"Tier `{report.tier}`, vLLM's serving benchmark (random dataset, greedy, ignore_eos); medians of "
        f"{len({r.round for r in report.runs})} alternating round(s).",
        "",
        "| load | path | output tok/s | vs bare | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | vs bare | ITL p50 ms "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in _specs(report):
        load = f"{spec.input_len}/{spec.output_len} tok, c={spec.concurrency}, {'stream' if spec.stream else 'unary'}"
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
            tpot_ratio = f"{tpot / bare_tpot:.2f}x" if bare_tpot and tpot and target != "bare" else ""
            if target != "bare" and bare_ttft is not None and spec.concurrency == 1:
                ratio += f" (TTFT +{ttft - bare_ttft:.1f} ms)"
            lines.append(
                f"| {load} | {target} | {tps:,.0f} | {ratio} | {ttft:.1f} | "
                f"{report.median(target, spec, 'ttft_p99_ms'):.1f} | {tpot:.2f} | {tpot_ratio} | "
                f"{report.median(target, spec, 'itl_p50_ms'):.2f} | {_failed(report, target, spec)} |"
            )
    return "\n".join(lines) + "\n"


def _failed(report: BenchReport, target: str, spec: LoadSpec) -> str:
    """Failed requests over all rounds, out of those sent (a throughput with failures is not comparable)."""
    runs = [r for r in report.runs if r.target == target and r.spec == spec]
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


def write(report: BenchReport, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report.to_json(), indent=1))
    table = markdown(report)
    (out / "results.md").write_text(table)
    plot(report, out / "throughput.png")
    return table
