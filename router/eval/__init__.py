"""Routing-quality evaluation: loaders, RouteLLM metrics, eval-side routers, calibration.

Heavy pieces (embedder, scikit-learn, matplotlib) are imported by the modules that use them, not here.
"""

from router.eval.calibrate import (
    Calibration,
    CascadeCalibration,
    confidence_threshold_for_pgr,
    confidence_threshold_for_rate,
    threshold_for_pgr,
    threshold_for_share,
)
from router.eval.datasets import BUILTIN, LabelledSet, default_data_dir, load_dataset
from router.eval.metrics import Curve, RouterMetrics, summarize, threshold_sweep

__all__ = [
    "BUILTIN",
    "Calibration",
    "CascadeCalibration",
    "confidence_threshold_for_pgr",
    "confidence_threshold_for_rate",
    "Curve",
    "LabelledSet",
    "RouterMetrics",
    "default_data_dir",
    "load_dataset",
    "summarize",
    "threshold_for_pgr",
    "threshold_for_share",
    "threshold_sweep",
]
