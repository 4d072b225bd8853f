"""Cascade section of the YAML config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CascadeConfig(BaseModel):
    """When an answer from a cheap tier is escalated to the next tier up."""

    model_config = ConfigDict(extra="forbid", frozen=True)
