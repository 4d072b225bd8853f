"""Where a deployment's replicas may run on a multi-node Ray cluster: custom resources and node labels.

Both are Ray's own mechanisms. A custom resource is declared by the nodes that offer it
(`ray start --resources '{"gpu_group": 1000}'`) and taken by each replica (`ray_actor_options["resources"]`);
a small amount per replica pins without limiting how many fit. A node label is set at `ray start --labels`
and matched by the replica's `label_selector`. This module checks the syntax Ray would refuse at deploy
time, so a config error names the field instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# Ray's (and Kubernetes') label syntax: ray/_private/label_utils.py.
_NAME = r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?"
_KEY = re.compile(rf"^({_NAME}(\.{_NAME})*/)?{_NAME}$")
_SELECTOR_VALUE = re.compile(rf"^!?(in\({_NAME}(, ?{_NAME})*\)|{_NAME})$")
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
_BUILTIN_RESOURCES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": None, "object_store_memory": None}


class Placement(BaseModel):
    """Node constraints of one deployment's replicas (empty: anywhere Ray finds room)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    custom: dict[str, float] = {}
    """Custom Ray resources each replica takes, e.g. {gpu_group: 0.01}: replicas run only on nodes started
    with that resource (`ray start --resources '{"gpu_group": 1000}'`)."""
    node_labels: dict[str, str] = {}
    """Labels the replica's node must carry (Ray's `label_selector`), e.g. {tierserve/group: gpu}; a node
    gets them with `ray start --labels tierserve/group=gpu`. A value may also be `!v`, `in(a,b)`, `!in(a,b)`."""

    @field_validator("custom")
    @classmethod
    def _check_custom(cls, custom: dict[str, float]) -> dict[str, float]:
        for name, amount in custom.items():
            if name in _BUILTIN_RESOURCES:
                instead = _BUILTIN_RESOURCES[name]
                fix = f"use {instead} instead" if instead else "Ray sets it per node; remove it"
                raise ValueError(f"{name!r} is a built-in Ray resource, not a custom one; {fix}.")
            if not _RESOURCE_NAME.match(name):
                raise ValueError(
                    f"resource name {name!r} must be 1-128 letters, digits, '_', '.', ':', '/' or '-' "
                    "(the name the nodes declare in `ray start --resources`)."
                )
            if not amount > 0 or round(amount * 10000) == 0:
                raise ValueError(
                    f"{name}: {amount} is not a usable amount; use at least 0.0001 (e.g. 0.01 to pin a replica "
                    "to the nodes offering it without limiting how many fit)."
                )
        return custom

    @field_validator("node_labels")
    @classmethod
    def _check_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _KEY.match(key) or len(key.rpartition("/")[2]) > 63:
                raise ValueError(
                    f"label key {key!r} is not a valid node label: an optional DNS prefix and '/', then up to 63 "
                    "letters, digits, '-', '_' or '.', starting and ending alphanumeric (e.g. tierserve/group)."
                )
            if not _SELECTOR_VALUE.match(value):
                raise ValueError(
                    f"{key}: {value!r} is not a label selector value; use a label value (e.g. gpu), `!value`, "
                    "`in(a,b)` or `!in(a,b)`; values are up to 63 letters, digits, '-', '_' or '.'."
                )
        return labels

    @property
    def pinned(self) -> bool:
        return bool(self.custom or self.node_labels)

    def actor_options(self) -> dict[str, Any]:
        """The `ray_actor_options` entries for these constraints (none when unconstrained)."""
        options: dict[str, Any] = {}
        if self.custom:
            options["resources"] = dict(self.custom)
        if self.node_labels:
            options["label_selector"] = dict(self.node_labels)
        return options

    def unmet(self, nodes: list[Mapping[str, Any]]) -> str | None:
        """Why no alive node of `nodes` (as `ray.nodes()` lists them) could run a replica; None if one can."""
        if not self.pinned:
            return None
        alive = [n for n in nodes if n.get("Alive")]
        if any(_fits(self, n) for n in alive):
            return None
        wants = []
        if self.custom:
            wants.append(f"resources {self.custom}")
        if self.node_labels:
            wants.append(f"labels {self.node_labels}")
        return f"no alive node of {len(alive)} offers {' and '.join(wants)}"


def _fits(placement: Placement, node: Mapping[str, Any]) -> bool:
    resources = node.get("Resources") or {}
    if any(resources.get(name, 0.0) < amount for name, amount in placement.custom.items()):
        return False
    labels = node.get("Labels") or {}
    return all(_label_matches(labels.get(key), selector) for key, selector in placement.node_labels.items())


def _label_matches(value: str | None, selector: str) -> bool:
    negate = selector.startswith("!")
    selector = selector.removeprefix("!")
    if selector.startswith("in("):
        options = {v.strip() for v in selector[3:-1].split(",")}
    else:
        options = {selector}
    return (value in options) != negate
