"""Where a deployment's replicas may run on a multi-node Ray cluster: custom resources and node labels.

Both are Ray's own mechanisms. A custom resource is declared by the nodes that offer it
(`ray start --resources '{"gpu_group": 1000}'`) and taken by each replica (`ray_actor_options["resources"]`);
a small amount per replica pins without limiting how many fit. A node label is set at `ray start --labels`
and matched by the replica's `label_selector`. This model checks the syntax Ray would refuse at deploy
time, so a config error names the field instead; `serving.config.placement` turns it into Ray's options.
"""

from __future__ import annotations

import re

from pydantic import field_validator

from router.configbase import StrictModel

# Ray's (and Kubernetes') label syntax: ray/_private/label_utils.py.
_NAME = r"[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,61}[a-zA-Z0-9])?"
_KEY = re.compile(rf"^({_NAME}(\.{_NAME})*/)?{_NAME}$")
_SELECTOR_VALUE = re.compile(rf"^!?(in\({_NAME}(, ?{_NAME})*\)|{_NAME})$")
_RESOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
_BUILTIN_RESOURCES = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": None, "object_store_memory": None}


class Placement(StrictModel):
    """Node constraints of one deployment's replicas (empty: anywhere Ray finds room)."""

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
        """Whether any constraint is set (else Ray places replicas anywhere)."""
        return bool(self.custom or self.node_labels)
