"""The evaluation report as a table, `results.json` and the cost-quality plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from router.eval.runner import EvalReport


def format_table(report: EvalReport) -> str:
    """Plain-text table of the report, one row per router / cascade plus the oracle.

    CPT columns are strong-model calls (RouteLLM's axis); `cost@50` is the total cost at CPT(50%) in percent
    of all-strong (a cascade pays its weak call on every query); `saved` is the cost saved at 95% of the
    strong model's quality. Intervals are 95% bootstrap intervals over the test rows.
    """
    head = (f"{report.dataset}: n_test={report.n_test}  strong={report.strong_acc:.2f}  "
            f"weak={report.weak_acc:.2f}  ({report.quality}, %)")
    info = [f"cost: {report.cost_basis}"]
    if report.confidence_kind:
        info.append(f"weak confidence: {'log-probability' if report.confidence_kind == 'logprob' else 'probability'}")
    width = max(12, *(len(n) + 2 for n in report.routers))
    cols = (f"{'policy':<{width}}{'CPT20%':>8}{'CPT50%':>8}{'CPT50 95% CI':>15}{'CPT80%':>8}{'AUC':>8}{'APGR':>7}"
            f"{'APGR 95% CI':>15}{'cost@50':>9}{'@95%':>8}{'saved':>9}")
    rows = [head, "; ".join(info), cols, "-" * len(cols)]
    for name, m in [*report.routers.items(), ("oracle", report.oracle)]:
        flags = [] if m.monotone else ["non-monotone"]
        if m.ci and m.like_random and name != "random":
            flags.append("not distinguishable from random")
        ci50, ci_a = m.ci.get("cpt50"), m.ci.get("apgr")
        rows.append(f"{name:<{width}}{m.cpt20:>8.1f}{m.cpt50:>8.1f}{_pair(ci50, '.1f'):>15}{m.cpt80:>8.1f}"
                    f"{m.auc:>8.2f}{m.apgr:>7.3f}{_pair(ci_a, '.3f'):>15}{_pct(m.cost_at_cpt50):>9}"
                    f"{m.strong_pct_at_95:>8.1f}{_pct(m.cost_saved_at_95 * 100):>9}"
                    + (f"  ({'; '.join(flags)})" if flags else ""))
    for label, c in report.comparisons.items():
        lo, hi = c["ci95"]
        verdict = "better" if lo > 0 else ("worse" if hi < 0 else "not distinguishable")
        rows.append(f"{label}: APGR {c['apgr']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}; {verdict})")
    if report.recommended:
        rows.append(f"router to deploy (chosen on train): {report.recommended['router']} — "
                    f"{report.recommended['reason']}")
    return "\n".join(rows)


def _pair(pair, fmt: str) -> str:
    if not pair or not np.all(np.isfinite(pair)):
        return "-"
    return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"


def _pct(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.1f}%"


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `cost_quality.png` into `out_dir`."""
    from router.eval.plot import plot_cost_quality

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    png_path = plot_cost_quality(report, out / "cost_quality.png")
    return json_path, png_path
