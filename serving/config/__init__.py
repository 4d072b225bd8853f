"""The one YAML config: tiers, engines, Ray resources, HTTP, router, cascade and capacity.

Every field carries its bounds in the type and a docstring under it. `load_config(path)` turns any
problem into a `ConfigError` whose message names the field, the bad value and the fix.
"""

from serving.config.app import (
    AppConfig,
    CostConfig,
    SessionsConfig,
    default_data_dir,
    load_config,
    parse_config,
)
from serving.config.http import HttpConfig, IngressConfig, LimitsConfig, RayConfig
from serving.config.placement import ResourcesConfig
from serving.config.plan import PlanConfig
from serving.config.tier import (
    AutoscalingConfig,
    DeploymentConfig,
    EngineConfig,
    TierConfig,
)

__all__ = [
    "AppConfig", "AutoscalingConfig", "CostConfig", "DeploymentConfig", "EngineConfig", "HttpConfig",
    "IngressConfig", "LimitsConfig", "PlanConfig", "RayConfig", "ResourcesConfig", "SessionsConfig", "TierConfig",
    "default_data_dir", "load_config", "parse_config",
]
