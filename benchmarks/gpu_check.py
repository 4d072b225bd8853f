"""GPU checks for a lent GPU machine with PyTorch and CUDA but no vLLM (under 8 minutes at full size).

(a) The router's embedder on CUDA: a model in BGE-M3's layout and shape (XLM-R large: 24 layers, hidden 1024,
    250,002-token vocabulary; random weights, a small generated tokenizer) loaded by the router's own embedder
    class (`router.embed.flag.FlagEmbedder`, FlagEmbedding underneath), fp16 on CUDA. 256-token texts: p50
    latency at batch 1 and texts/s at batch 64, against the same model in fp32 on the machine's CPU cores.
(b) The planner's arithmetic against torch: a Qwen2.5-7B-shaped decoder (its published widths and vocabulary,
    4 of its 28 layers so it builds in seconds) built on the device with random bf16 weights. Weight bytes from
    `serving.plan.shape.ModelShape` against `torch.cuda.memory_allocated()` (on CPU: the parameters' bytes),
    and the KV bytes per token against the cache tensors of a 512-token forward pass.

    python -m benchmarks.gpu_check                       # on the GPU machine: full size, cuda
    python -m benchmarks.gpu_check --size small          # anywhere (CPU): small shapes, seconds

Prints a table and writes JSON (default benchmarks/out/gpu_check.json). Not a test; nothing depends on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {
    # encoder (BGE-M3 = XLM-R large) and decoder (Qwen2.5-7B widths) shapes per --size
    "full": {"encoder": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                         "intermediate_size": 4096, "vocab_size": 250002},
             "decoder_layers": 4, "decoder": {}, "max_length": 256, "batch": 64, "runs": 50, "cpu_runs": 5},
    "small": {"encoder": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                          "intermediate_size": 128, "vocab_size": 4000},
              "decoder_layers": 2, "decoder": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
                                               "num_key_value_heads": 2, "vocab_size": 4000},
              "max_length": 256, "batch": 64, "runs": 10, "cpu_runs": 3},
}  # fmt: skip
WORDS = [f"{a}{b}" for a in ("lo", "ra", "mi", "ta", "ke", "su", "do", "ne") for b in ("n", "x", "r", "l", "th", "sk")]


def build_bge_m3_layout(path: Path, encoder: dict) -> Path:
    """A directory in BGE-M3's on-disk layout with random weights: tokenizer, config.json, model.safetensors,
    colbert_linear.pt and sparse_linear.pt (FlagEmbedding loads all of them)."""
    import random

    import torch
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS, k=40)) for _ in range(500)]
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    XLMRobertaTokenizer(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                        cls_token="<s>", sep_token="</s>", mask_token="<mask>").save_pretrained(path)  # fmt: skip
    torch.manual_seed(0)
    config = XLMRobertaConfig(**encoder, max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)  # fmt: skip
    XLMRobertaModel(config).eval().save_pretrained(path)
    hidden = encoder["hidden_size"]
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), path / "colbert_linear.pt")
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), path / "sparse_linear.pt")
    return path


def texts_of(tokens: int, count: int, seed: int = 1) -> list[str]:
    """Texts at least `tokens` tokens long (the embedder truncates them to max_length)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=tokens)) for _ in range(count)]


def time_embedder(embedder, texts: list[str], batch: int, runs: int, *, warm_batch: int) -> list[float]:
    """Seconds per call of `embedder.embed` on `batch` texts, `runs` times after a warm-up call."""
    embedder.embed(texts[:warm_batch])
    times = []
    for i in range(runs):
        chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        started = time.perf_counter()
        embedder.embed(chunk)  # returns numpy: the device work is done
        times.append(time.perf_counter() - started)
    return times


def embedder_check(size: dict, device: str, cpu_threads: int, workdir: Path) -> dict:
    from router.embed.flag import FlagEmbedder

    path = build_bge_m3_layout(workdir / "bge-m3-shaped", size["encoder"])
    texts = texts_of(size["max_length"] * 2, 256)
    result = {"shape": size["encoder"], "max_length": size["max_length"], "batch": size["batch"]}
    runs = {device: (size["runs"], max(3, size["runs"] // 5))}
    if device != "cpu":
        runs["cpu"] = (size["cpu_runs"], 1)
    for where, (n1, n64) in runs.items():
        embedder = FlagEmbedder(path, pooling="cls", max_length=size["max_length"], batch_size=size["batch"],
                                device=where, use_fp16=where != "cpu", require_m3_heads=True,
                                num_threads=cpu_threads)  # fmt: skip
        # On CUDA the first call at a new batch shape picks its kernels; on CPU a batch-64 warm-up only costs time.
        one = time_embedder(embedder, texts, 1, n1, warm_batch=1)
        many = time_embedder(embedder, texts, size["batch"], n64, warm_batch=1 if where == "cpu" else size["batch"])
        result[where] = {
            "dtype": "float16" if where != "cpu" else "float32",
            "threads": cpu_threads if where == "cpu" else None,
            "p50_batch1_ms": statistics.median(one) * 1000,
            "texts_per_s_batch": size["batch"] * len(many) / sum(many),
        }
        del embedder
    return result


def planner_check(size: dict, device: str) -> dict:
    """Planner's weight and KV arithmetic against what torch allocates for the same shape."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from serving.plan.catalog import find_decoder
    from serving.plan.shape import ModelShape

    published = dict(find_decoder("qwen2.5-7b").config)
    published.pop("torch_dtype")
    cfg = {**published, **size["decoder"], "num_hidden_layers": size["decoder_layers"]}
    config = Qwen2Config(**cfg)
    shape = ModelShape.from_hf_config({**cfg, "torch_dtype": "bfloat16"})
    cuda = device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    allocated = torch.cuda.memory_allocated() - before if cuda else params
    tokens = 512
    with torch.inference_mode():
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
        cache = model(ids, use_cache=True).past_key_values
    kv = sum(t.numel() * t.element_size() for layer in _cache_layers(cache) for t in layer)
    return {
        "shape": {**cfg, "of_layers": published["num_hidden_layers"]},
        "params": shape.parameter_count(),
        "torch_params": sum(p.numel() for p in model.parameters()),
        "planner_weight_bytes": shape.weight_bytes(2),
        "torch_allocated_bytes": allocated,
        "torch_parameter_bytes": params,
        "kv_tokens": tokens,
        "planner_kv_bytes": shape.kv_bytes_per_token(2) * tokens,
        "torch_kv_bytes": kv,
    }


def _cache_layers(cache) -> list[tuple]:
    """(key, value) per layer of a transformers cache, whichever cache class this version returns."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return [tuple(layer[:2]) for layer in cache]


def render(result: dict) -> str:
    e, p = result["embedder"], result["planner"]
    dev = result["device"]
    lines = [f"device: {result['device_name']}; size {result['size']}; {result['seconds']:.0f} s", "",
             (f"(a) router embedder, BGE-M3 layout {e['shape']['num_hidden_layers']} layers x {e['shape']['hidden_size']}, "
             f"random weights, {e['max_length']}-token texts")]  # fmt: skip
    header = f"  {'':<26}{dev + ' ' + e[dev]['dtype']:>18}"
    if "cpu" in e and dev != "cpu":
        header += f"{'cpu fp32, ' + str(e['cpu']['threads']) + ' threads':>26}{'ratio':>10}"
    lines.append(header)
    for key, label, unit, better in (("p50_batch1_ms", "p50 latency, batch 1", "ms", "low"),
                                     ("texts_per_s_batch", f"texts/s, batch {e['batch']}", "/s", "high")):  # fmt: skip
        row = f"  {label:<26}{e[dev][key]:>15.1f} {unit:<2}"
        if "cpu" in e and dev != "cpu":
            ratio = e["cpu"][key] / e[dev][key] if better == "low" else e[dev][key] / e["cpu"][key]
            row += f"{e['cpu'][key]:>23.1f} {unit:<2}{ratio:>9.1f}x"
        lines.append(row)
    gib = 1 << 30
    lines += ["", (f"(b) planner vs torch, Qwen2.5-7B-shaped decoder (hidden {p['shape']['hidden_size']}, "
                  f"{p['shape']['num_hidden_layers']} of {p['shape']['of_layers']} layers), random bf16 weights on {dev}"),
              f"  parameters      planner {p['params']:,}   torch {p['torch_params']:,}",
              (f"  weights         planner {p['planner_weight_bytes'] / gib:.3f} GiB   torch allocated "
              f"{p['torch_allocated_bytes'] / gib:.3f} GiB   ({p['torch_allocated_bytes'] / p['planner_weight_bytes']:.4f}x)"),
              (f"  KV, {p['kv_tokens']} tokens  planner {p['planner_kv_bytes'] / 2**20:.2f} MiB   cache tensors "
              f"{p['torch_kv_bytes'] / 2**20:.2f} MiB")]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: BGE-M3 and 7B widths; small: CPU")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--cpu-threads", type=int, default=min(8, os.cpu_count() or 1), help="threads of the CPU run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_check.json"))
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[args.size]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        embedder = embedder_check(size, device, args.cpu_threads, Path(workdir))
    planner = planner_check(size, device)
    result = {
        "size": args.size, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "embedder": embedder, "planner": planner,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(render(result))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
