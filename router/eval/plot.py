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
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, m in report.routers.items():
        ax.plot(m.curve.strong_pct, m.curve.quality, marker=".", label=f"{name} (APGR {m.apgr:.3f})")
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_report(table: pd.DataFrame, path: str | Path, *, dpi: int = 80) -> Path:
    """Query-log report over time: requests per bucket, strong-tier share and escalation rate."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    x = table.index
    top.bar(x, table["requests"], width=0.8 * _bucket_width(table), color="lightsteelblue")
    top.set_ylabel("requests")
    bottom.plot(x, table["escalation_rate"] * 100, marker=".", label="escalated")
    for col in [c for c in table.columns if c.startswith("share_")]:
        bottom.plot(x, table[col] * 100, marker=".", label=f"served by {col.removeprefix('share_')}")
    bottom.set_ylabel("% of requests")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
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
