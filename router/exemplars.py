"""Reading labelled exemplar files (JSONL or CSV) and the shipped default set."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import replace
from importlib import resources
from pathlib import Path

from router.types import Exemplar

DEFAULT_SOURCE = "default"


def load_default_exemplars() -> list[Exemplar]:
    """The shipped set (router/data/default_exemplars.jsonl): routine -> small, medium -> medium, hard -> large."""
    data = resources.files("router").joinpath("data/default_exemplars.jsonl")
    with resources.as_file(data) as path:
        exemplars = read_exemplars(path, source=DEFAULT_SOURCE, category_column="category")
    return [replace(ex, provenance="seed") for ex in exemplars]


def read_exemplars(
    path: str | Path,
    *,
    text_column: str = "text",
    tier_column: str = "tier",
    label_map: Mapping[str, str] | None = None,
    category_column: str | None = None,
    source: str | None = None,
) -> list[Exemplar]:
    """Exemplars from a `.jsonl` or `.csv` file.

    `label_map` turns the file's label values into tier labels (e.g. {"0": "small", "1": "large"}); values it
    does not mention are kept as they are. Rows with an empty text are skipped. `source` defaults to the file name.
    Raises ValueError naming the file, the row and the missing column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exemplar file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"exemplar file {str(path)!r} must end in .jsonl or .csv (got {suffix or 'no suffix'!r}).")
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _csv_rows(path)
    label_map = dict(label_map or {})
    source = source or path.name
    out: list[Exemplar] = []
    for line, row in rows:
        for column in (text_column, tier_column):
            if column not in row:
                raise ValueError(
                    f"{path}:{line}: no column {column!r} (columns: {sorted(row)}); "
                    "pass --text-column / --tier-column with the right names."
                )
        text = str(row[text_column] or "").strip()
        if not text:
            continue
        label = str(row[tier_column]).strip()
        category = row.get(category_column) if category_column else None
        out.append(
            Exemplar(
                text=text,
                tier=label_map.get(label, label),
                source=source,
                category=str(category) if category not in (None, "") else None,
            )
        )
    return out


def parse_label_map(items: list[str] | None) -> dict[str, str]:
    """`["0=small", "1=large"]` -> {"0": "small", "1": "large"}."""
    mapping: dict[str, str] = {}
    for item in items or []:
        value, sep, tier = item.partition("=")
        if not sep or not value or not tier:
            raise ValueError(f"label map entry {item!r} must look like VALUE=TIER, e.g. 1=large.")
        mapping[value.strip()] = tier.strip()
    return mapping


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line}: not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line}: each line must be a JSON object, got {type(row).__name__}.")
            yield line, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        # Row 1 is the header, so data starts on line 2.
        for line, row in enumerate(csv.DictReader(f), 2):
            yield line, row
