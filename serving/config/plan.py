"""What a config's GPU numbers were planned for, so `tierserve plan --config FILE` reproduces them without flags."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from router.configbase import StrictModel
from serving.plan.memory import DEFAULT_RESERVE, GPU_TYPES


class PlanConfig(StrictModel):
    """The load and the GPU the tiers' `engine`/`resources` numbers were sized for by `tierserve plan`.
    Not used to serve; a `tierserve plan` flag overrides the matching field."""

    gpu: str | None = None
    """GPU type the shares were planned on (`tierserve plan --gpu`), e.g. h100-80gb. None: h100-80gb."""
    gpu_memory_gib: float | None = Field(default=None, gt=0, le=4096)
    """GPU memory in GiB, for a GPU not in the planner's table (instead of `gpu`)."""
    gpus: int | None = Field(default=None, ge=1)
    """GPUs available; the plan refuses tiers that need more."""
    seq_len: dict[str, Annotated[int, Field(ge=16)]] = {}
    """Tokens each of a tier's `max_num_seqs` concurrent sequences holds, by tier (default: its max_model_len)."""
    concurrency: dict[str, Annotated[int, Field(ge=1, le=4096)]] = {}
    """Sequences resident at once, by tier (default: its engine.max_num_seqs)."""
    reserve: float = Field(default=DEFAULT_RESERVE, ge=0.0, lt=1.0)
    """Share of each GPU left free for other processes and fragmentation."""
    fill: bool = True
    """Spread the memory left after every target over the KV caches (false: leave it free)."""

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, gpu: str | None) -> str | None:
        if gpu is not None and gpu.lower() not in GPU_TYPES:
            raise ValueError(f"{gpu!r} is not a GPU type the planner knows; use one of {', '.join(GPU_TYPES)} "
                             "or gpu_memory_gib.")  # fmt: skip
        return gpu.lower() if gpu else gpu

    @model_validator(mode="after")
    def _one_gpu_size(self) -> PlanConfig:
        if self.gpu is not None and self.gpu_memory_gib is not None:
            raise ValueError(f"set gpu ({self.gpu}) or gpu_memory_gib ({self.gpu_memory_gib}), not both.")
        return self

    def check_tiers(self, tiers: dict[str, int]) -> None:
        """`tiers`: tier name -> max_model_len. Per-tier fields must name tiers and fit their context."""
        for field in ("seq_len", "concurrency"):
            unknown = sorted(set(getattr(self, field)) - set(tiers))
            if unknown:
                raise ValueError(f"plan.{field} names unknown tiers {unknown}; use tiers from {list(tiers)}.")
        for name, length in self.seq_len.items():
            if length > tiers[name]:
                raise ValueError(
                    f"plan.seq_len.{name} ({length}) cannot exceed tiers[{name}].engine.max_model_len "
                    f"({tiers[name]}); lower it or raise max_model_len."
                )
