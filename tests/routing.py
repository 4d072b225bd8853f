"""Test helper: a router's decisions for plain texts with the same knobs."""

from __future__ import annotations

from router.core import Router
from router.types import RouteDecision, RouteInput


def route(router: Router, texts: list[str], *, threshold: float | None = None, router_kind: str | None = None
          ) -> list[RouteDecision]:
    """`router.route_inputs` for `texts`, each with `threshold` and `router_kind`."""
    return router.route_inputs([RouteInput(text=t, threshold=threshold, router=router_kind) for t in texts])
