"""`tierserve plan`: parameter and KV arithmetic against published model shapes, fits and refusals on real
GPU sizes, the cost figures, and the CLI on config files (including the shipped deploy/gpu-7b-34b.yaml)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.cli import main
from serving.config import load_config, parse_config
from serving.plan.memory import (
    GPU_TYPES,
    PlanError,
    TierRequest,
    gpu_seconds_per_1k_tokens,
    plan,
    usd_per_1k_tokens,
)
from serving.plan.shape import ModelShape

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIG = REPO / "deploy" / "gpu-7b-34b.yaml"
GIB = 1 << 30
KIB = 1 << 10
H100 = GPU_TYPES["h100-80gb"]
H200 = GPU_TYPES["h200-141gb"]

# Published config.json fields of real checkpoints (only what decides memory).
LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
CODELLAMA_34B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 22016,
    "num_hidden_layers": 48,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN25_32B = {
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN25_32B_AWQ = {
    **QWEN25_32B,
    "torch_dtype": "float16",
    "quantization_config": {"bits": 4, "group_size": 128, "quant_method": "awq", "version": "gemm", "zero_point": True},
}
SHIPPED_MODELS = {"small": QWEN25_7B, "large": QWEN25_32B_AWQ}  # what deploy/gpu-7b-34b.yaml serves


def shape(cfg: dict) -> ModelShape:
    return ModelShape.from_hf_config(cfg)


def request(name: str, cfg: dict, **kw) -> TierRequest:
    defaults = {"max_model_len": 8192, "concurrency": 32, "seq_len": 2048, "max_num_batched_tokens": 8192}
    return TierRequest(name=name, shape=shape(cfg), device="gpu", **{**defaults, **kw})


def model_dir(root: Path, name: str, cfg: dict) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def planned_yaml(stdout: str) -> dict[str, dict]:
    """{tier: {"engine": ..., "resources": ...}} from the YAML block the planner prints last."""
    block = stdout[stdout.index("tiers:") :]
    return {t.pop("name"): t for t in yaml.safe_load(block)["tiers"]}


# ---- shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "published"),
    [(LLAMA2_7B, 6.74e9), (CODELLAMA_34B, 33.7e9), (QWEN25_7B, 7.62e9), (QWEN25_32B, 32.8e9)],
    ids=["llama-2-7b", "codellama-34b", "qwen2.5-7b", "qwen2.5-32b"],
)
def test_parameter_count_matches_the_published_size(cfg: dict, published: float) -> None:
    assert shape(cfg).parameter_count() == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize(
    ("cfg", "tp", "kv_bytes"),
    [
        (LLAMA2_7B, 1, 512 * KIB),
        (QWEN25_7B, 1, 56 * KIB),
        (CODELLAMA_34B, 1, 192 * KIB),
        (QWEN25_32B, 1, 256 * KIB),
        (CODELLAMA_34B, 2, 96 * KIB),  # each rank holds half the KV heads
        (CODELLAMA_34B, 16, 24 * KIB),  # 8 KV heads over 16 ranks: one (replicated) head per rank
    ],
)
def test_kv_bytes_per_token_are_exact(cfg: dict, tp: int, kv_bytes: int) -> None:
    assert shape(cfg).kv_bytes_per_token(2, tp) == kv_bytes


def test_tied_embeddings_drop_the_lm_head() -> None:
    untied, tied = shape(QWEN25_7B), shape({**QWEN25_7B, "tie_word_embeddings": True})
    assert untied.parameter_count() - tied.parameter_count() == 152064 * 3584


def test_awq_4bit_weights_agree_with_the_hand_arithmetic() -> None:
    # deploy/gpu-7b-34b.yaml's original hand sum: 31.2e9 int4 linear params + scales + fp16 embeddings = 18.1 GiB
    awq = shape(QWEN25_32B_AWQ).weight_bytes(2)
    assert awq == pytest.approx(18.1 * GIB, rel=0.02)
    assert awq < 0.3 * shape(QWEN25_32B).weight_bytes(2)


def test_unknown_quantization_and_missing_fields_are_named() -> None:
    with pytest.raises(ValueError, match="quant_method 'hqq'"):
        shape({**QWEN25_7B, "quantization_config": {"quant_method": "hqq"}})
    cfg = {k: v for k, v in QWEN25_7B.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match="missing vocab_size"):
        shape(cfg)


def _safetensors_tensors(path: Path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return header


def test_tiny_models_match_their_checkpoint_files() -> None:
    from serving.config import default_data_dir
    from serving.models.tiny import generate_tiny_models
    from serving.plan.shape import load_shape

    for path in generate_tiny_models(default_data_dir() / "models").values():
        tensors = _safetensors_tensors(path / "model.safetensors")
        numel = sum(_prod(t["shape"]) for t in tensors.values())
        nbytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in tensors.values())
        tiny = load_shape(path)
        assert tiny.parameter_count() == numel, path.name
        assert tiny.weight_bytes(4) == nbytes, path.name


def _prod(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


# ---- fits and refusals ------------------------------------------------------------------------------


def test_h100_hosts_the_7b_and_the_32b_awq_on_one_gpu() -> None:
    tiers = [
        request("small", QWEN25_7B, concurrency=128, seq_len=1024),
        request("large", QWEN25_32B_AWQ, dtype="float16", concurrency=64, seq_len=1024, max_model_len=16384),
    ]
    result = plan(tiers, gpu_bytes=H100)
    assert sum(t.gpu_memory_utilization for t in result.tiers) <= 0.9
    for t, req in zip(result.tiers, tiers, strict=True):
        assert t.num_gpus == t.gpu_memory_utilization, t.name
        assert t.weight_bytes + t.overhead_bytes + t.kv_cache_bytes <= t.gpu_memory_utilization * H100, t.name  # Ray's packing keeps memory in bounds
        assert t.seqs_at(req.seq_len) >= req.concurrency, t.name
        assert t.seqs_at(req.max_model_len) >= 1, t.name
        assert t.max_num_seqs == req.concurrency


def test_no_fill_leaves_the_spare_memory_free() -> None:
    tiers = [request("small", QWEN25_7B), request("large", QWEN25_32B_AWQ, dtype="float16")]
    filled, lean = plan(tiers, gpu_bytes=H200), plan(tiers, gpu_bytes=H200, fill=False)
    assert sum(t.gpu_memory_utilization for t in lean.tiers) < 0.6 < sum(t.gpu_memory_utilization for t in filled.tiers)
    for t in lean.tiers:
        assert t.kv_cache_bytes == t.kv_target_bytes == 32 * 2048 * t.kv_bytes_per_token


def test_unquantized_34b_next_to_the_7b_needs_an_h200() -> None:
    tiers = [request("small", QWEN25_7B), request("large", CODELLAMA_34B)]
    on_h200 = plan(tiers, gpu_bytes=H200)
    assert on_h200.tier("large").weight_bytes > 62 * GIB
    with pytest.raises(PlanError, match=r"tier large does not fit.* short by \d+\.\d GiB"):
        plan(tiers, gpu_bytes=H100)


def _shortfall_gib(tiers: list[TierRequest], gpu_bytes: int) -> float:
    with pytest.raises(PlanError) as exc:
        plan(tiers, gpu_bytes=gpu_bytes)
    return float(re.search(r"short by (\d+\.\d) GiB", str(exc.value)).group(1))


def test_the_reported_shortfall_is_what_it_takes_to_fit() -> None:
    tiers = [request("small", QWEN25_7B), request("large", CODELLAMA_34B)]
    short = _shortfall_gib(tiers, H100)
    usable = 0.9  # the default reserve leaves 10 % of each GPU free
    # Adding the shortfall to the usable memory fits (plus 2 % per tier for rounding shares to whole percent);
    # anything clearly less does not.
    assert plan(tiers, gpu_bytes=H100 + int((short + 0.04 * 80) / usable * GIB))
    assert _shortfall_gib(tiers, H100 + int((short - 0.3) / usable * GIB)) <= 0.4


def test_a_single_tier_too_big_for_any_share_is_refused_by_name() -> None:
    with pytest.raises(
        PlanError, match=r"tier big does not fit: it needs .* of 36\.0 GiB usable \(0\.90 of 40\.0 GiB\)"
    ):
        plan([request("big", CODELLAMA_34B)], gpu_bytes=GPU_TYPES["a100-40gb"])


def test_tensor_parallel_2_shards_weights_and_kv_over_whole_gpus() -> None:
    one = request("large", CODELLAMA_34B, seq_len=4096)
    with pytest.raises(PlanError, match="tier large does not fit"):
        plan([one], gpu_bytes=H100)
    two = TierRequest(**{**one.__dict__, "tensor_parallel_size": 2})
    sharded = plan([two], gpu_bytes=H100, gpu_count=2).tier("large")
    assert sharded.weight_bytes == pytest.approx(shape(CODELLAMA_34B).weight_bytes(2) / 2, abs=1)
    assert sharded.kv_bytes_per_token == 96 * KIB
    assert sharded.num_gpus == 2 and sharded.gpu_memory_utilization <= 0.9
    assert sharded.seqs_at(4096) >= 32
    with pytest.raises(PlanError, match="need 2 GPUs .* --gpus is 1"):
        plan([two], gpu_bytes=H100, gpu_count=1)
    with pytest.raises(PlanError, match="tensor_parallel_size 3 must divide"):
        plan([TierRequest(**{**one.__dict__, "tensor_parallel_size": 3})], gpu_bytes=H100)


# ---- cost --------------------------------------------------------------------------------------------


def test_gpu_seconds_and_dollars_per_1k_tokens() -> None:
    # 1,000 tokens at 2,000 tok/s take 0.5 s on half a GPU: 0.25 GPU-seconds; at $3.60/GPU-hour, $0.00025.
    assert gpu_seconds_per_1k_tokens(2000, 0.5) == pytest.approx(0.25)
    assert gpu_seconds_per_1k_tokens(500, 2) == pytest.approx(4.0)
    assert usd_per_1k_tokens(2000, 0.5, 3.6) == pytest.approx(0.00025)
    with pytest.raises(PlanError, match="tokens_per_s"):
        gpu_seconds_per_1k_tokens(0, 0.5)
    with pytest.raises(PlanError, match="num_gpus"):
        gpu_seconds_per_1k_tokens(100, 0)


# ---- the command line -------------------------------------------------------------------------------


def _gpu_config(tmp_path: Path, large: dict) -> Path:
    config = yaml.safe_load(GPU_CONFIG.read_text())
    config["tiers"][0]["model"] = str(model_dir(tmp_path, "small", QWEN25_7B))
    config["tiers"][1]["model"] = str(model_dir(tmp_path, "large", large))
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_plans_a_config_file_into_yaml_that_config_accepts(tmp_path: Path) -> None:
    path = _gpu_config(tmp_path, QWEN25_32B_AWQ)
    code, out, _ = run_cli(
        [
            "plan",
            "--config",
            str(path),
            "--gpu",
            "h200-141gb",
            "--seq-len",
            "2048",
            "--tokens-per-s",
            "small=2400,large=720",
            "--usd-per-gpu-hour",
            "3.6",
        ]
    )
    assert code == 0
    assert "co-located on each GPU" in out and "kv_cache_memory_bytes is explicit" in out
    planned = planned_yaml(out)
    config = yaml.safe_load(path.read_text())
    for tier in config["tiers"]:
        tier["engine"].update(planned[tier["name"]]["engine"])
        tier["resources"].update(planned[tier["name"]]["resources"])
    merged = parse_config(config)
    large = merged.tier("large")
    assert large.engine.kv_cache_memory_bytes // (256 * KIB) >= 64 * 2048
    # cost lines: GPU-s = share x 1000 / tokens_per_s; $ = GPU-s x 3.6 / 3600
    share = large.resources.num_gpus
    assert f"large: {share * 1000 / 720:.3f} GPU-s at 720 tok/s" in out
    assert f"${share * 1000 / 720 / 1000:.5f}" in out


def test_cli_refuses_what_does_not_fit_with_a_nonzero_exit(tmp_path: Path) -> None:
    path = _gpu_config(tmp_path, CODELLAMA_34B)
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "--config", str(path), "--gpu", "h100-80gb", "--seq-len", "2048"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode != 0
    assert re.search(r"tier large does not fit.* short by \d+\.\d GiB", proc.stderr)
    assert proc.stdout == ""


def test_cli_what_if_without_a_file(tmp_path: Path) -> None:
    small = model_dir(tmp_path, "llama2", LLAMA2_7B)
    code, out, _ = run_cli(
        ["plan", "--model", f"chat={small}", "--context", "4096", "--concurrency", "16", "--gpu", "a100-80gb", "--yaml"]
    )
    assert code == 0 and not out.startswith("GPU")
    (tier,) = yaml.safe_load(out)["tiers"]
    assert tier["name"] == "chat" and tier["engine"]["max_model_len"] == 4096 and tier["engine"]["max_num_seqs"] == 16
    assert tier["engine"]["kv_cache_memory_bytes"] >= 16 * 4096 * 512 * KIB


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu", "h300"], "--gpu 'h300' is not known"),
        (["--seq-len", "medium=10"], "--seq-len: unknown tier ['medium']"),
        (["--context", "lots"], "--context 'lots': expected VALUE or TIER=VALUE"),
        (["--model", "/models/x"], "each must be TIER=MODEL"),
    ],
)
def test_cli_errors_name_the_flag(argv: list[str], message: str, tmp_path: Path) -> None:
    path = _gpu_config(tmp_path, QWEN25_32B_AWQ)
    code, _, err = run_cli(["plan", "--config", str(path), *argv])
    assert code == 2 and message in err


def test_cli_on_cpu_tiers_reports_weights_and_kv_per_token() -> None:
    from serving.config import default_data_dir
    from serving.models.tiny import TINY_MODELS, generate_tiny_models

    generate_tiny_models(default_data_dir() / "models")
    code, out, _ = run_cli(["plan", "--config", str(REPO / "deploy" / "cpu.yaml")])
    assert code == 0 and "no GPU tiers" in out and "share" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("small ", "large "))}
    for spec in TINY_MODELS:  # float32: 2 x layers x kv_heads x head_dim x 4 bytes
        kv = 2 * spec.num_layers * spec.num_kv_heads * (spec.hidden_size // spec.num_heads) * 4
        assert f"{kv} B" in " ".join(rows[spec.name]) or f"{kv // KIB} KiB" in " ".join(rows[spec.name])
        assert rows[spec.name][-1] == "cpu"


def _assert_agrees_with_the_shipped_file(stdout: str) -> None:
    planned = planned_yaml(stdout)
    config = load_config(GPU_CONFIG)
    assert set(planned) == set(config.tier_names)
    for tier in config.tiers:
        got = planned[tier.name]
        shipped_engine = {k: getattr(tier.engine, k) for k in got["engine"]}
        assert shipped_engine == got["engine"], tier.name
        assert tier.resources.num_gpus == got["resources"]["num_gpus"], tier.name
    router = yaml.safe_load(stdout[stdout.index("router:"):])["router"]
    assert config.router.num_gpus == router["num_gpus"] > 0


def test_shipped_gpu_config_is_what_the_planner_says_with_no_flags() -> None:
    """`tierserve plan --config deploy/gpu-7b-34b.yaml`, with no flags and no weights here, reproduces the file:
    its `plan:` section says what it was planned for, the planner knows both models' published shapes."""
    text = GPU_CONFIG.read_text()
    match = re.search(r"^#\s+(tierserve plan .+)$", text, re.MULTILINE)
    assert match, "deploy/gpu-7b-34b.yaml should name the `tierserve plan` command its numbers come from"
    argv = shlex.split(match.group(1))[1:]
    assert argv == ["plan", "--config", "deploy/gpu-7b-34b.yaml"], "the file's numbers need no flags"
    assert not any(Path(t.model).exists() for t in load_config(GPU_CONFIG).tiers)  # planned from published shapes
    code, out, _ = run_cli(["plan", "--config", str(GPU_CONFIG)])
    assert code == 0
    assert "Qwen/Qwen2.5-7B-Instruct (published config.json" in out
    assert "Qwen/Qwen2.5-32B-Instruct-AWQ (published config.json" in out
    _assert_agrees_with_the_shipped_file(out)


def test_the_same_plan_from_the_checkpoints_config_json(tmp_path: Path) -> None:
    """With the models' config.json files on disk (as on a GPU node), the plan is the same."""
    argv = ["plan", "--config", str(GPU_CONFIG), "--yaml"]
    for name, cfg in SHIPPED_MODELS.items():
        argv += ["--model", f"{name}={model_dir(tmp_path, name, cfg)}"]
    code, out, _ = run_cli(argv)
    assert code == 0
    _assert_agrees_with_the_shipped_file(out)


def test_flags_override_the_plan_section() -> None:
    code, out, _ = run_cli(["plan", "--config", str(GPU_CONFIG), "--gpu", "h200-141gb", "--yaml"])
    assert code == 0
    planned = planned_yaml(out)
    assert planned["large"]["engine"]["kv_cache_memory_bytes"] > 2 * load_config(GPU_CONFIG).tier("large").engine.kv_cache_memory_bytes


def test_the_router_share_counts_bge_m3_in_the_gpu_budget() -> None:
    config = load_config(GPU_CONFIG)
    code, out, _ = run_cli(["plan", "--config", str(GPU_CONFIG)])
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("router embedder"))
    # BGE-M3 is XLM-R large: 568 M params, 1.06 GiB in fp16; 64 texts x 256 tokens of activations; a CUDA context.
    assert "567.75 M params" in line and "batch 64 x 256" in line and "weights 1.06 GiB" in line
    assert config.router.embedder.kind == "bge-m3" and config.router.embedder.use_fp16
    shares = sum(t.resources.num_gpus for t in config.tiers) + config.router.num_gpus
    assert shares == pytest.approx(1.0)
    # Without the router's GPU share the tiers get its memory back.
    alone = {**yaml.safe_load(GPU_CONFIG.read_text()), "router": {}}
    assert sum(t.gpu_memory_utilization for t in plan_of(alone).tiers) > sum(t.resources.num_gpus for t in config.tiers)


def plan_of(raw: dict):
    """The plan of a config mapping, as `tierserve plan --config` makes it."""
    import argparse

    from serving.cli.plan import build_requests, router_request

    config = parse_config(raw)
    args = argparse.Namespace(model=[], tp=None, context=None, concurrency=None, seq_len=None)
    requests, _ = build_requests(args, config)
    return plan(requests, gpu_bytes=H100, router=router_request(config))


def test_cli_gpu_memory_override_sizes_an_unlisted_gpu(tmp_path: Path) -> None:
    llama = model_dir(tmp_path, "llama2", LLAMA2_7B)
    argv = ["plan", "--model", f"chat={llama}", "--context", "4096", "--concurrency", "16"]
    # 16 x 4096 tokens x 512 KiB = 32 GiB of KV cache next to 12.6 GiB of fp16 weights
    code, _, err = run_cli([*argv, "--gpu-memory-gib", "40"])
    assert code == 2 and "tier chat does not fit" in err and "of 36.0 GiB usable (0.90 of 40.0 GiB)" in err
    code, out, _ = run_cli([*argv, "--gpu-memory-gib", "64", "--yaml"])
    assert code == 0 and yaml.safe_load(out)["tiers"][0]["engine"]["kv_cache_memory_bytes"] >= 32 * GIB


@pytest.mark.parametrize(
    ("plan_section", "message"),
    [
        ({"gpu": "h300"}, "plan.gpu: 'h300' is not a GPU type the planner knows"),
        ({"gpu": "h100-80gb", "gpu_memory_gib": 80}, "set gpu (h100-80gb) or gpu_memory_gib (80.0), not both"),
        ({"seq_len": {"medium": 1024}}, "plan.seq_len names unknown tiers ['medium']"),
        ({"seq_len": {"small": 9000}}, "plan.seq_len.small (9000) cannot exceed tiers[small].engine.max_model_len (8192)"),
        ({"reserve": 1.0}, "plan.reserve"),
    ],
)
def test_the_plan_section_is_validated_by_field(plan_section: dict, message: str) -> None:
    from router.errors import ConfigError

    raw = {**yaml.safe_load(GPU_CONFIG.read_text()), "plan": plan_section}
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert message in str(exc.value)
