"""Router section of the YAML config (owned by the router package)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RouterConfig(BaseModel):
    """How `model="auto"` requests pick a tier. Filled in by the router work."""

    model_config = ConfigDict(extra="forbid", frozen=True)
