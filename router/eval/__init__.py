"""Routing-quality evaluation: loaders, RouteLLM metrics, calibration."""
