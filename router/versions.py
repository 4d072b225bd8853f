"""Versions of the exemplar store: what a version is, and which exemplars it holds (pure, no Qdrant).

Every write to the store (an import, an admin add, a batch of learned exemplars, a delete, a rollback) is a
version. A version names its parent; its exemplars are its parent's plus those it added, less those it
removed. A point carries the version that added it and the versions that removed it, so version V holds the
points added by a version in V's lineage (V, its parent, its parent's parent, ...) and removed by none of them.
A rollback to V is a new version whose parent is V: history is kept, so one can roll forward again.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from router.errors import VersionError

VersionKind = Literal["initial", "seed", "import", "admin", "learn", "delete", "rollback"]
"""What made a version: `initial` (points written before the store had versions), `seed` (the shipped
defaults), `import` (a file), `admin` (the admin endpoint), `learn` (cascade outcomes and feedback),
`delete`, `rollback` (to an older version)."""


@dataclass(frozen=True)
class StoreVersion:
    """One version of the exemplar store."""

    version: int
    """1, 2, 3, ... in the order versions were begun."""
    parent: int
    """The version this one changes (0: the empty store)."""
    kind: VersionKind
    created_at: float
    """Unix seconds when it was begun."""
    note: str = ""
    """E.g. the imported file, or `to 3` for a rollback."""
    committed: bool = False
    """True once it was made the active version at least once; a version never committed is a write that did
    not finish (it is never served)."""
    size: int | None = None
    """Exemplars it holds, counted when it was committed."""
    updated_at: float | None = None
    """Last time exemplars were written into it (learning keeps writing into its open version for a while)."""

    def to_payload(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_payload(payload: Mapping) -> StoreVersion:
        known = set(StoreVersion.__dataclass_fields__)
        return StoreVersion(**{k: v for k, v in payload.items() if k in known})


def lineage(versions: Mapping[int, StoreVersion], version: int) -> tuple[int, ...]:
    """`version` and its ancestors, oldest first; () for version 0 (the empty store).

    Raises KeyError naming a version the records do not hold (a record lost in a crash mid-write)."""
    chain: list[int] = []
    seen: set[int] = set()
    current = version
    while current:
        if current in seen:  # only a hand-edited record could loop; stop rather than spin
            break
        if current not in versions:
            raise KeyError(f"exemplar store version {current} has no record")
        seen.add(current)
        chain.append(current)
        current = versions[current].parent
    return tuple(reversed(chain))


def holds(point_version: int, removed_in: Sequence[int], chain: Collection[int]) -> bool:
    """Whether a point added by `point_version` and removed by `removed_in` is in a version of lineage `chain`."""
    return point_version in chain and not any(v in chain for v in removed_in)


def check_rollback(versions: Mapping[int, StoreVersion], target: int, active: int) -> StoreVersion:
    """The version to roll back to, or `VersionError` (a ValueError, a 400 at the HTTP edge) saying which
    versions exist."""
    record = versions.get(target)
    if record is None or not record.committed:
        known = sorted(v for v, r in versions.items() if r.committed)
        raise VersionError(f"exemplar store version {target} does not exist; versions: {known or 'none yet'} "
                           "(`tierserve exemplars versions` lists them).", param="version")
    if target == active:
        raise VersionError(f"version {target} is already the active version; nothing to roll back.",
                           param="version")
    return record


def version_kind(provenances: Iterable[str]) -> VersionKind:
    """The kind of a version written from exemplars of these provenances."""
    kinds = set(provenances)
    if kinds and kinds <= {"cascade", "feedback"}:
        return "learn"
    if kinds == {"seed"}:
        return "seed"
    return "admin" if kinds == {"admin"} else "import"
