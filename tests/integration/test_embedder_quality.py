"""`python -m benchmarks.embedder_quality` regenerates the static-vs-teacher quality table (a smoke run here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from benchmarks import embedder_quality
from router.eval.datasets import default_data_dir

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "routellm").is_dir(), reason=f"shared routing data not found at {DATA} (set TIERSERVE_EVAL_DATA)"
)


@needs_data
def test_the_command_writes_the_table_for_minilm_and_its_static_embedder(tmp_path, capsys):
    out = tmp_path / "quality.md"
    data_dir = Path(os.environ["TIERSERVE_DATA_DIR"])  # the distilled model is shared with the other tests
    rc = embedder_quality.main(["--datasets", "mt-bench,mbpp", "--limit", "40", "--bootstrap", "10",
                                "--cache-dir", str(data_dir), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert text in printed and f"wrote {out}" in printed
    assert "Smoke run on 40 train and 40 test rows" in text
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (\S+) \| (\d+) / (\d+) \| minilm:model \| ([\d.]+)% \[[\d.]+, [\d.]+\] \| ([\d.]+)% \[[\d.]+, [\d.]+\] "
        r"\| ([+-][\d.]+) \| [\d.]+ / [\d.]+ \| (yes|\*\*no\*\*) \| ([\d.]+)% \| ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \| (\d+)% "
        r"\(([\d.]+)\) \| (yes|\*\*no\*\*) \|$", text, re.M)}
    assert set(rows) == {"mt-bench", "mbpp"}
    for m in rows.values():
        teacher, static, loss = float(m.group(4)), float(m.group(5)), float(m.group(6))
        assert 0 <= teacher <= 100 and 0 <= static <= 100
        assert loss == pytest.approx(static - teacher, abs=0.11)
        assert (m.group(7) == "yes") == (loss <= embedder_quality.MAX_LOSS_POINTS)
        first, first_loss, low, high = (float(m.group(i)) for i in (8, 9, 10, 11))
        share, margin = int(m.group(12)), float(m.group(13))
        assert 0 <= first <= 100 and first_loss == pytest.approx(first - teacher, abs=0.11)
        assert low <= high and 0 <= share <= 100 and 0 < margin < 1
        assert (m.group(14) == "yes") == (first_loss <= embedder_quality.MAX_LOSS_POINTS)
    assert "- Static embedder of `minilm:model`:" in text
    assert "- Static first pass with `minilm:model` near a boundary" in text
    # The margin's quantile, cross-validated on the train rows alone: the smallest within a point on every set.
    quantiles = embedder_quality.QUANTILES
    cells = r"( \| [+-][\d.]+ \(\d+%\)){" + str(len(quantiles)) + "}"
    losses = {m.group(1): [float(v) for v in re.findall(r"\| ([+-][\d.]+) \(", m.group(0))]
              for m in re.finditer(r"^\| (mt-bench|mbpp)" + cells + r" \|$", text, re.M)}
    assert set(losses) == {"mt-bench", "mbpp"}
    picked = float(re.search(r"^- Picked: q=([\d.]+) ", text, re.M).group(1))
    at = quantiles.index(picked)
    limit, rounding = embedder_quality.MAX_LOSS_POINTS, 0.05  # the table's losses are rounded to 0.1
    assert picked == 1.0 or all(row[at] <= limit + rounding for row in losses.values())
    if at > 0:  # every smaller quantile lost more than a point somewhere
        assert all(any(row[i] > limit - rounding for row in losses.values()) for i in range(at))
