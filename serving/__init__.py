"""tierserve serving: vLLM tier deployments, the OpenAI-compatible ingress and the CLI."""
