"""`tierserve plan`: size each tier's engine and GPU share from its model's shape (see serving/plan/memory.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from serving.plan.memory import (
    DEFAULT_RESERVE,
    GIB,
    GPU_TYPES,
    Plan,
    PlanError,
    RouterRequest,
    TierRequest,
    gpu_seconds_per_1k_tokens,
    plan,
    usd_per_1k_tokens,
)

if TYPE_CHECKING:
    from serving.config import AppConfig

DEFAULT_GPU = "h100-80gb"
WHAT_IF_BATCHED_TOKENS = 8192
WHAT_IF_CONTEXT = 8192
"""A what-if tier's max_model_len without --context (capped by the model's own max_position_embeddings)."""
WHAT_IF_SEQ_LEN = 2048
"""A what-if tier's tokens per concurrent sequence without --seq-len: a long chat, not a full context."""
START_NOTE = (
    "kv_cache_memory_bytes is explicit on purpose: engines that start together on one GPU would each count the\n"
    "other's weights as their own overhead in vLLM's profiling run and size their KV cache too small (or fail).\n"
    "With it set, the engines may start together. If you remove it, start the tiers one at a time (the large\n"
    "tier first, the small one once it is ready) so each profiles alone."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="GPU memory planner: weights, KV cache, gpu_memory_utilization and num_gpus per tier",
        description="Size each tier from its model's config.json (or the published shape of the model it names) "
        "and the GPU; refuse what cannot fit. A config's `plan:` section says what it was planned for, so "
        "`--config FILE` alone reproduces it; flags override it. SPEC is one value for every tier or "
        "TIER=VALUE,TIER=VALUE.",
    )
    p.add_argument("--config", help="tierserve YAML to plan (tiers, engine settings, device, plan:)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="TIER=MODEL",
        help="model directory, config.json or published model name (e.g. qwen2.5-32b-awq) for a tier (overrides "
        "the config; without --config, each --model adds a GPU tier: a what-if)",
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu", type=str.lower, help=f"GPU type: {', '.join(GPU_TYPES)} (default: the config's plan.gpu, else {DEFAULT_GPU})"
    )
    gpu.add_argument("--gpu-memory-gib", type=float, help="GPU memory in GiB, for a GPU not in the table")
    p.add_argument("--gpus", type=int, help="GPUs available; refuse plans that need more")
    p.add_argument("--tp", metavar="SPEC", help="tensor_parallel_size (default: the config's, else 1)")
    p.add_argument(
        "--context", metavar="SPEC",
        help=f"max_model_len (default: the config's, else {WHAT_IF_CONTEXT} capped by the model's own)",
    )
    p.add_argument(
        "--concurrency",
        metavar="SPEC",
        help="sequences resident at once = max_num_seqs (default: plan.concurrency, the config's max_num_seqs, else 32)",
    )
    p.add_argument(
        "--seq-len", metavar="SPEC",
        help="tokens each concurrent sequence holds (default: plan.seq_len, else the context; a what-if without "
        f"--context: {WHAT_IF_SEQ_LEN})",
    )
    p.add_argument(
        "--reserve",
        type=float,
        help=f"share of each GPU left free (default: plan.reserve, else {DEFAULT_RESERVE})",
    )
    p.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        default=None,
        help="size KV caches to the targets only and leave the rest free (default: plan.fill, else spread it over them)",
    )
    p.add_argument(
        "--tokens-per-s",
        metavar="SPEC",
        help="measured output tokens/s per replica, e.g. "
        "small=2400,large=700: prints GPU-seconds (and $) per 1k output tokens",
    )
    p.add_argument("--usd-per-gpu-hour", type=float, help="price of one GPU-hour, for $ per 1k tokens")
    p.add_argument("--yaml", action="store_true", help="print only the engine/resources YAML")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from serving.config import load_config

    config = load_config(args.config) if args.config else None
    planned_for = config.plan if config and config.plan else None
    requests, sources = build_requests(args, config)
    router = router_request(config)
    memory_gib = args.gpu_memory_gib or (None if args.gpu else planned_for and planned_for.gpu_memory_gib)
    gpu_name = f"{memory_gib} GiB GPU" if memory_gib else (args.gpu or (planned_for and planned_for.gpu) or DEFAULT_GPU)
    gpu_bytes = int(memory_gib * GIB) if memory_gib else _gpu_bytes(gpu_name)
    result = plan(
        requests,
        gpu_bytes=gpu_bytes,
        gpu_count=args.gpus or (planned_for.gpus if planned_for else None),
        reserve=_first(args.reserve, planned_for and planned_for.reserve, DEFAULT_RESERVE),
        fill=_first(args.fill, planned_for and planned_for.fill, True),
        router=router,
    )
    if not args.yaml:
        print(render_report(result, gpu_name, sources))
        if args.tokens_per_s:
            rates = per_tier("--tokens-per-s", args.tokens_per_s, [t.name for t in result.tiers], float)
            print(render_cost(result, rates, args.usd_per_gpu_hour))
        print()
    print(render_yaml(result), end="")
    return 0


def _first(*values: object) -> Any:
    """The first value that is not None (a flag, then the config's plan section, then the default)."""
    return next(v for v in values if v is not None)


def _gpu_bytes(name: str) -> int:
    if name not in GPU_TYPES:
        raise PlanError(f"--gpu {name!r} is not known; use one of {', '.join(GPU_TYPES)} or --gpu-memory-gib.")
    return GPU_TYPES[name]


def per_tier(flag: str, spec: str | None, names: list[str], cast: Callable[[str], object]) -> dict:
    """Parse "VALUE" (every tier) or "TIER=VALUE,TIER=VALUE" into {tier: value}."""
    if spec is None:
        return {}
    try:
        if "=" not in spec:
            return dict.fromkeys(names, cast(spec))
        pairs = dict(part.split("=", 1) for part in spec.split(","))
        values = {name.strip(): cast(value) for name, value in pairs.items()}
    except ValueError:
        raise PlanError(
            f"{flag} {spec!r}: expected VALUE or TIER=VALUE,TIER=VALUE, e.g. small=1024,large=2048."
        ) from None
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise PlanError(f"{flag}: unknown tier {unknown}; tiers are {names}.")
    return values


def build_requests(args: argparse.Namespace, config: AppConfig | None) -> tuple[list[TierRequest], dict[str, str]]:
    """One TierRequest per tier, from the config file, its `plan:` section and flags (or from --model alone for a
    what-if), and where each tier's shape came from."""
    from serving.plan.catalog import resolve_shape

    if any("=" not in m for m in args.model):
        raise PlanError(f"--model {args.model}: each must be TIER=MODEL, e.g. --model large=/models/Qwen2.5-32B.")
    names = config.tier_names if config else [m.split("=", 1)[0].strip() for m in args.model]
    models = per_tier("--model", ",".join(args.model) or None, names, str)
    if config:
        tiers = [(t.name, models.get(t.name) or str(config.model_path(t)), t.engine) for t in config.tiers]
    elif models:
        tiers = [(name, path, None) for name, path in models.items()]
    else:
        raise PlanError("plan needs --config FILE, or --model TIER=MODEL (repeatable) for a what-if.")
    planned_for = config.plan if config else None
    tp = per_tier("--tp", args.tp, names, int)
    context = per_tier("--context", args.context, names, int)
    concurrency = {**(planned_for.concurrency if planned_for else {}), **per_tier("--concurrency", args.concurrency, names, int)}
    seq_len = {**(planned_for.seq_len if planned_for else {}), **per_tier("--seq-len", args.seq_len, names, int)}
    requests, sources = [], {}
    for name, model, engine in tiers:
        try:
            shape, sources[name] = resolve_shape(model)
        except (OSError, ValueError) as exc:
            raise PlanError(f"tier {name}: {exc}") from None
        if engine is None and name not in context:  # a what-if with no --context: long chats in a usual context
            max_len = min(WHAT_IF_CONTEXT, shape.max_position_embeddings or WHAT_IF_CONTEXT)
            seq_len.setdefault(name, min(WHAT_IF_SEQ_LEN, max_len))
        elif engine is None:
            max_len = context[name]
        else:
            max_len = context.get(name) or engine.max_model_len
        requests.append(
            TierRequest(
                name=name,
                shape=shape,
                device=config.device if config else "gpu",
                dtype=engine.dtype if engine else "auto",
                tensor_parallel_size=tp.get(name, engine.tensor_parallel_size if engine else 1),
                max_model_len=max_len,
                concurrency=concurrency.get(name, engine.max_num_seqs if engine else 32),
                seq_len=seq_len.get(name),
                max_num_batched_tokens=engine.max_num_batched_tokens if engine else WHAT_IF_BATCHED_TOKENS,
                enforce_eager=engine.enforce_eager if engine else False,
                kv_cache_memory_bytes=engine.kv_cache_memory_bytes if engine else None,
            )
        )
    return requests, sources


def router_request(config: AppConfig | None) -> RouterRequest | None:
    """The router's embedder when the config gives the router deployment a GPU share (router.num_gpus > 0)."""
    from serving.plan.embedder import encoder_shape

    if config is None or config.router.num_gpus <= 0:
        return None
    embedder = config.router.embedder
    shape, _ = encoder_shape(embedder.kind, embedder.model_path)
    return RouterRequest(shape=shape, batch_size=min(embedder.batch_size, config.router.batch_max_size),
                         max_length=embedder.max_length, fp16=embedder.use_fp16)  # fmt: skip


def _size(n: int) -> str:
    """Bytes in the largest binary unit: whole numbers as is, else one or two decimals."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            if n % scale == 0:
                return f"{n // scale} {unit}"
            value = n / scale
            return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def render_report(result: Plan, gpu_name: str, sources: dict[str, str] | None = None) -> str:
    lines = [f"{name}: {source}" for name, source in (sources or {}).items()]
    if any(t.device == "gpu" for t in result.tiers):
        used = f"{result.gpus_needed} GPU(s) per set of replicas"
        avail = f" of {result.gpu_count}" if result.gpu_count else ""
        lines.append(
            f"GPU {gpu_name}: {result.gpu_bytes / GIB:.1f} GiB each; {used}{avail}; "
            f"{result.reserve:.0%} of each left free"
        )
    header = ["tier", "params", "weights", "overhead", "KV/token", "KV cache", "KV tokens"]
    header += ["seqs x len", "seqs x ctx", "share"]
    rows = [header]
    for t in result.tiers:
        rows.append(
            (
                t.name,
                _count(t.params),
                _size(t.weight_bytes),
                _size(t.overhead_bytes) if t.device == "gpu" else "-",
                _size(t.kv_bytes_per_token) + (f" (TP {t.tensor_parallel_size})" if t.tensor_parallel_size > 1 else ""),
                _size(t.kv_cache_bytes) if t.kv_cache_bytes else "-",
                f"{t.kv_tokens:,}",
                f"{t.seqs_at(t.seq_len)} x {t.seq_len}",
                f"{t.seqs_at(t.max_model_len)} x {t.max_model_len}",
                f"{t.gpu_memory_utilization:.2f}" if t.gpu_memory_utilization else "cpu",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if any(t.device == "gpu" for t in result.tiers):
        lines.append(
            "(per GPU; overhead = CUDA context + CUDA graphs + NCCL + peak activations, logits and any "
            "dequantized weight copy: see serving/plan/memory.py)"
        )
    r = result.router
    if r is not None:
        lines.append(
            f"router embedder ({_count(r.params)} params, batch {r.batch_size} x {r.max_length} tokens): weights "
            f"{_size(r.weight_bytes)} + activations {_size(r.activation_bytes)} + CUDA context "
            f"{_size(r.overhead_bytes)} = {_size(r.need_bytes)}, in a share of {r.num_gpus:.2f} "
            f"({_size(int(r.num_gpus * result.gpu_bytes))})"
        )
    shared = [t for t in result.tiers if t.device == "gpu" and t.tensor_parallel_size == 1]
    if len(shared) > 1 or (shared and r is not None):
        total = sum(t.gpu_memory_utilization for t in shared) + (r.num_gpus if r else 0)
        parts = " + ".join([f"{t.name} {t.num_gpus:.2f}" for t in shared] + ([f"router {r.num_gpus:.2f}"] if r else []))
        lines.append(f"co-located on each GPU: {parts} = {total:.2f} (Ray num_gpus = each memory share)")
        if len(shared) > 1:
            lines.append(START_NOTE)
    return "\n".join(lines)


def render_cost(result: Plan, tokens_per_s: dict[str, float], usd_per_gpu_hour: float | None) -> str:
    lines = ["cost per 1k output tokens:"]
    for t in result.tiers:
        if t.name not in tokens_per_s:
            continue
        if not t.num_gpus:
            lines.append(f"  {t.name}: CPU tier, no GPU share to charge")
            continue
        gpu_s = gpu_seconds_per_1k_tokens(tokens_per_s[t.name], t.num_gpus)
        usd = (
            ""
            if usd_per_gpu_hour is None
            else f", ${usd_per_1k_tokens(tokens_per_s[t.name], t.num_gpus, usd_per_gpu_hour):.5f}"
        )
        lines.append(f"  {t.name}: {gpu_s:.3f} GPU-s at {tokens_per_s[t.name]:g} tok/s on {t.num_gpus:g} GPU{usd}")
    return "\n".join(lines)


def render_yaml(result: Plan) -> str:
    """The planned engine/resources fields of every GPU tier, to merge into a config's tiers."""
    gpu = [t for t in result.tiers if t.device == "gpu"]
    if not gpu:
        return "# no GPU tiers: nothing to size (CPU tiers keep their kv_cache_memory_bytes)\n"
    out = []
    if sum(t.tensor_parallel_size == 1 for t in gpu) > 1:
        out.append("# co-located engines: keep kv_cache_memory_bytes explicit (vLLM's profiling would count the")
        out.append("# other engine's weights); without it, start the tiers one at a time")
    out.append("tiers:")
    for t in gpu:
        out += [
            f"  - name: {t.name}",
            "    engine:",
            f"      tensor_parallel_size: {t.tensor_parallel_size}",
            f"      max_model_len: {t.max_model_len}",
            f"      max_num_seqs: {t.max_num_seqs}",
            f"      gpu_memory_utilization: {t.gpu_memory_utilization:.2f}",
            f"      kv_cache_memory_bytes: {t.kv_cache_bytes}   # {_size(t.kv_cache_bytes)}, {t.kv_tokens:,} tokens",
            "    resources:",
            f"      num_gpus: {t.num_gpus:.2f}" if t.tensor_parallel_size == 1 else f"      num_gpus: {t.num_gpus}",
        ]
    if result.router is not None:
        out += ["router:", f"  num_gpus: {result.router.num_gpus:.2f}"]
    return "\n".join(out) + "\n"
