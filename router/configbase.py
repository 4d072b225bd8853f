"""The base of every config model, router's and serving's: unknown fields are errors, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: `extra="forbid"` so a misspelt field is refused by name; frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
