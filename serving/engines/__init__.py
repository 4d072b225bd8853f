"""Inference engines behind one interface (`Engine`); only `serving.engines.vllm` imports vLLM."""

from serving.engines.base import Engine

__all__ = ["Engine"]
