"""Cost–quality plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from router.eval.runner import EvalReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cost_quality(report: EvalReport, path: str | Path, *, dpi: int = 80) -> Path:
    """Every router's curve, the random diagonal, the oracle and both models' quality on one chart."""
    plt = _pyplot()
    costed = any(m.kind == "cascade" for m in report.routers.values())
    fig, axes = plt.subplots(1, 2 if costed else 1, figsize=(14 if costed else 8, 5), squeeze=False)
    ax = axes[0][0]
    for name, m in report.routers.items():
        style = "--" if m.kind == "cascade" else "-"
        ax.plot(m.curve.strong_pct, m.curve.quality, marker=".", linestyle=style, label=f"{name} (APGR {m.apgr:.3f})")
    ax.plot([0, 100], [report.weak_acc, report.strong_acc], color="grey", linestyle=":", label="random (expected)")
    ax.plot(report.oracle.curve.strong_pct, report.oracle.curve.quality, color="black", linestyle="-.",
            linewidth=1, label="oracle")
    ax.axhline(report.strong_acc, color="red", linestyle="--", linewidth=0.8, label="strong model")
    ax.axhline(report.weak_acc, color="grey", linestyle="--", linewidth=0.8, label="weak model")
    ax.set_xlabel("strong-model calls (%)")
    ax.set_ylabel(f"quality ({report.quality}, %)")
    ax.set_title(f"{report.dataset}: cost–quality on the test split (n={report.n_test})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if costed:
        cost_ax = axes[0][1]
        for name, m in report.routers.items():
            style = "--" if m.kind == "cascade" else "-"
            cost_ax.plot(m.curve.cost, m.curve.quality, marker=".", linestyle=style, label=name)
        cost_ax.axhline(report.strong_acc, color="red", linestyle="--", linewidth=0.8)
        cost_ax.axhline(report.weak_acc, color="grey", linestyle="--", linewidth=0.8)
        cost_ax.set_xlabel("total cost (% of all-strong; cascades pay the weak call on every query)")
        cost_ax.set_ylabel(f"quality ({report.quality}, %)")
        cost_ax.set_title(f"same policies by total cost ({report.cost_basis})", fontsize=9)
        cost_ax.grid(alpha=0.3)
        cost_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_report(table: pd.DataFrame, path: str | Path, *, dpi: int = 80, cascade: pd.DataFrame | None = None) -> Path:
    """Query-log report over time: requests per bucket, strong-tier share and escalation rate; with `cascade`
    (see `report.cascade_over_time`) also its escalation rate against the target and confidence quantiles."""
    plt = _pyplot()
    panels = 4 if cascade is not None and not cascade.empty else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3 * panels), sharex=True)
    top, bottom = axes[0], axes[1]
    x = table.index
    top.bar(x, table["requests"], width=0.8 * _bucket_width(table), color="lightsteelblue")
    top.set_ylabel("requests")
    bottom.plot(x, table["escalation_rate"] * 100, marker=".", label="escalated")
    for col in [c for c in table.columns if c.startswith("share_")]:
        bottom.plot(x, table[col] * 100, marker=".", label=f"served by {col.removeprefix('share_')}")
    bottom.set_ylabel("% of requests")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    if panels == 4:
        rate_ax, conf_ax = axes[2], axes[3]
        tier = cascade.attrs.get("tier", "")
        rate_ax.plot(cascade.index, cascade["escalation_rate"] * 100, marker=".", label=f"escalated ({tier})")
        if cascade["target"].notna().any():
            rate_ax.axhline(cascade["target"].iloc[0] * 100, color="red", linestyle="--", label="calibrated target")
        rate_ax.set_ylabel("% of scored answers")
        rate_ax.legend(fontsize=8)
        rate_ax.grid(alpha=0.3)
        conf_ax.fill_between(cascade.index, cascade["confidence_p10"], cascade["confidence_p90"], alpha=0.3,
                             label="confidence p10–p90")
        conf_ax.plot(cascade.index, cascade["confidence_p50"], marker=".", label="confidence median")
        conf_ax.plot(cascade.index, cascade["threshold"], color="red", linestyle="--", label="threshold")
        conf_ax.set_ylabel("confidence")
        conf_ax.legend(fontsize=8)
        conf_ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _bucket_width(table: pd.DataFrame) -> float:
    if len(table.index) < 2:
        return 1.0 / 24
    return float((table.index[1] - table.index[0]).total_seconds() / 86_400)
