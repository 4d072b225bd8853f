"""GPU memory planner: from model shapes and a GPU, the engine and Ray numbers that fit.

Everything here is a pure function of its arguments; `serving/cli/plan.py` reads files and prints.

Per engine and GPU the planner counts
  weights    parameters from the shape (embeddings, q/k/v/o with GQA, gate/up/down, norms, lm_head unless
             tied) x bytes per parameter (dtype, or quantization bits plus group scales and zeros), / TP;
  overhead   CUDA context and allocator slack (512 MiB) + CUDA graphs (1 GiB, none with enforce_eager)
             + NCCL buffers (512 MiB, TP > 1 only) + peak activations of one engine step
             (max_num_batched_tokens x (gate and up outputs + 4 hidden-sized buffers), one layer at a time)
             + the sampler's fp32 logits for max_num_seqs rows, twice (logits and the sorted copy)
             + for AWQ/GPTQ/bitsandbytes, the 16-bit copy of the largest weight a dequantizing kernel makes;
  KV cache   2 (K, V) x layers x KV heads per GPU x head_dim x dtype bytes per token.
A share of the GPU (`gpu_memory_utilization` = Ray `num_gpus`) covers all three, so Ray never packs engines
whose memory adds up to more than a GPU; `reserve` (default 10 %) of each GPU stays free for other
processes and fragmentation. A router deployment with a GPU share (`router.num_gpus`) runs its embedder on the
GPU the single-GPU tiers share: its need (`serving.plan.embedder`) comes out of that GPU's budget before the KV
caches are filled, and its Ray share is what the tiers leave (so it also holds the reserve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from router.errors import TierserveError
from serving.plan.embedder import EncoderShape
from serving.plan.shape import ModelShape, dtype_bytes


class PlanError(TierserveError, ValueError):
    """A GPU plan that cannot work; the message names the tier, the shortfall and the fix."""

GIB = 1 << 30
MIB = 1 << 20
CONTEXT_BYTES = 512 * MIB
CUDA_GRAPH_BYTES = 1 * GIB
NCCL_BYTES = 512 * MIB
KV_BLOCK_TOKENS = 16
"""vLLM allocates the KV cache in blocks of this many tokens; a sequence holds whole blocks."""
KV_ROUND_BYTES = 256 * MIB
"""Planned KV caches are rounded down to this (at least the target is kept)."""
DEFAULT_RESERVE = 0.10

GPU_TYPES: dict[str, int] = {
    # Memory as nvidia-smi reports it (MiB); --gpu-memory-gib overrides.
    "h100-80gb": 81559 * MIB,
    "h200-141gb": 143771 * MIB,
    "a100-40gb": 40960 * MIB,
    "a100-80gb": 81920 * MIB,
    "l40s-48gb": 46068 * MIB,
}


@dataclass(frozen=True)
class TierRequest:
    """What one tier asks for: its model, where it runs, and the load its KV cache must hold."""

    name: str
    shape: ModelShape
    device: Literal["gpu", "cpu"]
    dtype: str = "auto"
    """Engine dtype; "auto" takes the checkpoint's (float32 checkpoints run in 16 bits on GPU, as vLLM does)."""
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    """Longest sequence: the KV cache always holds one of these."""
    concurrency: int = 32
    """Sequences resident at once (becomes max_num_seqs)."""
    seq_len: int | None = None
    """Tokens each of the `concurrency` sequences holds; None means max_model_len."""
    max_num_batched_tokens: int = 8192
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None
    """CPU tiers: the configured KV cache, reported on (CPU tiers are not planned)."""


@dataclass(frozen=True)
class TierPlan:
    """The planned footprint and engine settings of one tier, per GPU."""

    name: str
    device: Literal["gpu", "cpu"]
    params: int
    weight_bytes: int
    """Per GPU (whole model / tensor_parallel_size)."""
    overhead_bytes: int
    kv_bytes_per_token: int
    """Per GPU: KV heads are split across TP ranks (replicated when there are fewer heads than ranks)."""
    kv_target_bytes: int
    kv_cache_bytes: int
    tensor_parallel_size: int
    max_model_len: int
    seq_len: int
    max_num_seqs: int
    gpu_memory_utilization: float | None = None
    num_gpus: float | None = None

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache_bytes // self.kv_bytes_per_token

    def seqs_at(self, length: int) -> int:
        """Sequences of `length` tokens the KV cache holds at once."""
        return self.kv_tokens // _blocks(length)


@dataclass(frozen=True)
class RouterRequest:
    """The router deployment's embedder on a GPU share: its shape and the batch it embeds at once."""

    shape: EncoderShape
    batch_size: int
    max_length: int
    fp16: bool = True


@dataclass(frozen=True)
class RouterPlan:
    """The router's footprint on the shared GPU and its Ray share."""

    params: int
    weight_bytes: int
    activation_bytes: int
    overhead_bytes: int
    """CUDA context and allocator slack of the router's own process."""
    batch_size: int
    max_length: int
    num_gpus: float = 0.0

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes


def router_plan(req: RouterRequest) -> RouterPlan:
    act = 2 if req.fp16 else 4
    return RouterPlan(
        params=req.shape.parameter_count(),
        weight_bytes=req.shape.parameter_count() * act,
        activation_bytes=req.shape.activation_bytes(req.batch_size, req.max_length, act),
        overhead_bytes=CONTEXT_BYTES,
        batch_size=req.batch_size,
        max_length=req.max_length,
    )


@dataclass(frozen=True)
class Plan:
    """Every tier's plan on one GPU type, in config order (and the router's, when it takes a GPU share)."""

    gpu_bytes: int | None
    gpu_count: int | None
    reserve: float
    tiers: tuple[TierPlan, ...]
    router: RouterPlan | None = None

    def tier(self, name: str) -> TierPlan:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def gpus_needed(self) -> int:
        """One GPU shared by all single-GPU tiers plus whole GPUs for each sharded tier."""
        gpu = [t for t in self.tiers if t.device == "gpu"]
        shared = any(t.tensor_parallel_size == 1 for t in gpu) or self.router is not None
        return int(shared) + sum(t.tensor_parallel_size for t in gpu if t.tensor_parallel_size > 1)


def _blocks(tokens: int) -> int:
    return math.ceil(tokens / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS


def engine_dtype_bytes(req: TierRequest) -> int:
    """Bytes of one activation/KV element for this engine."""
    if req.dtype != "auto":
        return dtype_bytes(req.dtype)
    size = dtype_bytes(req.shape.torch_dtype)
    return 2 if req.device == "gpu" and size == 4 else size


def overhead_bytes(req: TierRequest, act_bytes: int) -> int:
    """Non-weight, non-KV memory of one engine on one GPU (the rule in the module docstring)."""
    s, tp = req.shape, req.tensor_parallel_size
    activations = req.max_num_batched_tokens * (2 * s.intermediate_size // tp + 4 * s.hidden_size) * act_bytes
    logits = 2 * req.concurrency * s.vocab_size * 4
    fixed = CONTEXT_BYTES + (0 if req.enforce_eager else CUDA_GRAPH_BYTES) + (NCCL_BYTES if tp > 1 else 0)
    return fixed + activations + logits + dequant_workspace_bytes(req, act_bytes)


def dequant_workspace_bytes(req: TierRequest, act_bytes: int) -> int:
    """Integer weight-only kernels (vLLM's AWQ path for >= 256 tokens, GPTQ, bitsandbytes) dequantize a whole
    weight to 16 bits before the matmul; the largest is the merged gate/up projection. Marlin kernels skip
    this, but which kernel runs depends on the GPU, so the planner keeps room for it."""
    quant = req.shape.quantization
    if quant is None or quant.method == "fp8":
        return 0
    s = req.shape
    return s.hidden_size * 2 * s.intermediate_size // req.tensor_parallel_size * act_bytes


def _check_tp(req: TierRequest) -> None:
    s, tp = req.shape, req.tensor_parallel_size
    if s.num_attention_heads % tp or (s.num_key_value_heads >= tp and s.num_key_value_heads % tp):
        raise PlanError(
            f"tier {req.name}: tensor_parallel_size {tp} must divide num_attention_heads "
            f"({s.num_attention_heads}) and num_key_value_heads ({s.num_key_value_heads}); pick a divisor."
        )


def _base_plan(req: TierRequest) -> TierPlan:
    """Weights, overhead and the KV target of one tier, before any share is picked."""
    _check_tp(req)
    act = engine_dtype_bytes(req)
    tp = req.tensor_parallel_size
    kv_per_token = req.shape.kv_bytes_per_token(act, tp)
    seq_len = req.seq_len or req.max_model_len
    if seq_len > req.max_model_len:
        raise PlanError(f"tier {req.name}: seq_len ({seq_len}) cannot exceed max_model_len ({req.max_model_len}).")
    target_tokens = max(req.concurrency * _blocks(seq_len), _blocks(req.max_model_len))
    gpu = req.device == "gpu"
    return TierPlan(
        name=req.name,
        device=req.device,
        params=req.shape.parameter_count(),
        weight_bytes=math.ceil(req.shape.weight_bytes(act) / tp),
        overhead_bytes=overhead_bytes(req, act) if gpu else 0,
        kv_bytes_per_token=kv_per_token,
        kv_target_bytes=target_tokens * kv_per_token,
        kv_cache_bytes=(target_tokens * kv_per_token) if gpu else (req.kv_cache_memory_bytes or 0),
        tensor_parallel_size=tp,
        max_model_len=req.max_model_len,
        seq_len=seq_len,
        max_num_seqs=req.concurrency,
    )


def plan(
    requests: list[TierRequest],
    *,
    gpu_bytes: int | None,
    gpu_count: int | None = None,
    reserve: float = DEFAULT_RESERVE,
    fill: bool = True,
    router: RouterRequest | None = None,
) -> Plan:
    """Size every GPU tier; raise PlanError naming the tier and its shortfall when something cannot fit.

    Single-GPU tiers share one GPU (Ray fractional `num_gpus`); a sharded tier (TP > 1) gets whole GPUs.
    With `fill`, memory left after every target is met goes to the KV caches in proportion to their
    targets; otherwise it stays free. `router`: the router's embedder shares the single-GPU tiers' GPU.
    """
    if not 0 <= reserve < 1:
        raise PlanError(f"reserve ({reserve}) must be in [0, 1): the share of each GPU left free.")
    base = [_base_plan(r) for r in requests]
    gpu_tiers = [t for t in base if t.device == "gpu"]
    if (gpu_tiers or router) and gpu_bytes is None:
        raise PlanError("GPU tiers need a GPU size: pass --gpu (e.g. h100-80gb) or --gpu-memory-gib.")
    planned = {t.name: t for t in base}
    shared = [t for t in gpu_tiers if t.tensor_parallel_size == 1]
    embedder = router_plan(router) if router else None
    if shared:
        taken = embedder.need_bytes if embedder else 0
        planned.update({t.name: t for t in _fit_group(shared, gpu_bytes, reserve, fill, taken)})
    for t in gpu_tiers:
        if t.tensor_parallel_size > 1:
            planned.update({t.name: t for t in _fit_group([t], gpu_bytes, reserve, fill)})
    if embedder:
        embedder = _fit_router(embedder, [planned[t.name] for t in shared], gpu_bytes, reserve, fill)
    result = Plan(gpu_bytes, gpu_count, reserve, tuple(planned[t.name] for t in base), embedder)
    if gpu_count is not None and result.gpus_needed > gpu_count:
        parts = [f"{t.name} TP {t.tensor_parallel_size}" for t in gpu_tiers if t.tensor_parallel_size > 1]
        parts += ["1 shared by " + ", ".join(t.name for t in shared)] if shared else []
        raise PlanError(
            f"the tiers need {result.gpus_needed} GPUs ({'; '.join(parts)}) but --gpus is {gpu_count}; "
            "lower tensor_parallel_size or add GPUs."
        )
    return result


def _need(t: TierPlan) -> int:
    return t.weight_bytes + t.overhead_bytes + t.kv_target_bytes


def _fit_router(embedder: RouterPlan, shared: list[TierPlan], gpu_bytes: int, reserve: float, fill: bool) -> RouterPlan:
    """The router's Ray share: what the tiers leave of their GPU (`fill`), else its own need rounded up."""
    if not shared and embedder.need_bytes > gpu_bytes * (1 - reserve):
        raise PlanError(
            f"the router's embedder needs {_gib(embedder.need_bytes)} GiB, more than {_gib(gpu_bytes * (1 - reserve))} "
            "GiB usable of a GPU; lower router.embedder.batch_size or max_length."
        )
    own = math.ceil(embedder.need_bytes / gpu_bytes * 100) / 100
    left = math.floor((1 - sum(t.gpu_memory_utilization for t in shared)) * 100 + 1e-9) / 100
    share = left if fill and shared else own
    return replace(embedder, num_gpus=share)


def _fit_group(
    group: list[TierPlan], gpu_bytes: int, reserve: float, fill: bool, taken: int = 0
) -> list[TierPlan]:
    """Pick shares for tiers that share each of their GPUs; `taken` bytes of it belong to the router."""
    usable = gpu_bytes * (1 - reserve) - taken
    used = 0
    for i, t in enumerate(group):
        used += _need(t)
        if used > usable:
            others = [f"{o.name} {_gib(_need(o))} GiB" for o in group[:i]]
            others += [f"the router's embedder {_gib(taken)} GiB"] if taken else []
            after = f" next to {', '.join(others)}" if others else ""
            raise PlanError(
                f"tier {t.name} does not fit: it needs {_gib(_need(t))} GiB per GPU (weights "
                f"{_gib(t.weight_bytes)} + overhead {_gib(t.overhead_bytes)} + KV {_gib(t.kv_target_bytes)} for "
                f"{t.max_num_seqs} x {t.seq_len} tokens){after}, of {_gib(usable + taken)} GiB usable "
                f"({1 - reserve:.2f} of {_gib(gpu_bytes)} GiB): short by {_gib(used - usable)} GiB. Lower its "
                "concurrency, seq_len or max_model_len, quantize it, raise tensor_parallel_size or use a larger GPU."
            )
    spare = usable - used
    kv_total = sum(t.kv_target_bytes for t in group)
    result = []
    for t in group:
        floor_share = math.ceil(_need(t) / gpu_bytes * 100) / 100
        wanted = (_need(t) + spare * t.kv_target_bytes / kv_total) / gpu_bytes if fill else 0.0
        share = max(floor_share, math.floor(wanted * 100 + 1e-9) / 100)
        room = int(share * gpu_bytes) - t.weight_bytes - t.overhead_bytes
        kv = max(t.kv_target_bytes, room // KV_ROUND_BYTES * KV_ROUND_BYTES) if fill else t.kv_target_bytes
        num_gpus = share if t.tensor_parallel_size == 1 else t.tensor_parallel_size
        result.append(replace(t, kv_cache_bytes=kv, gpu_memory_utilization=share, num_gpus=num_gpus))
    total = sum(t.gpu_memory_utilization for t in result) + taken / gpu_bytes
    if total > 1 - reserve + 1e-9:
        raise PlanError(
            f"tiers {', '.join(t.name for t in group)} fit only before rounding their shares up to whole "
            f"percent ({total:.2f} > {1 - reserve:.2f}); lower one tier's concurrency or the reserve."
        )
    return result


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def gpu_seconds_per_1k_tokens(tokens_per_s: float, num_gpus: float) -> float:
    """GPU-seconds one tier spends per 1,000 output tokens at a measured throughput on its GPU share."""
    if tokens_per_s <= 0:
        raise PlanError(f"tokens_per_s ({tokens_per_s}) must be > 0: pass a measured output throughput.")
    if num_gpus <= 0:
        raise PlanError(f"num_gpus ({num_gpus}) must be > 0: the tier's GPU share (resources.num_gpus).")
    return num_gpus * 1000.0 / tokens_per_s


def usd_per_1k_tokens(tokens_per_s: float, num_gpus: float, usd_per_gpu_hour: float) -> float:
    """Dollars per 1,000 output tokens from GPU-seconds and a price per GPU-hour."""
    if usd_per_gpu_hour < 0:
        raise PlanError(f"usd_per_gpu_hour ({usd_per_gpu_hour}) must be >= 0.")
    return gpu_seconds_per_1k_tokens(tokens_per_s, num_gpus) * usd_per_gpu_hour / 3600.0
