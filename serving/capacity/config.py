"""Capacity section of the YAML config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CapacityConfig(BaseModel):
    """Load-aware routing and admission control."""

    model_config = ConfigDict(extra="forbid", frozen=True)
