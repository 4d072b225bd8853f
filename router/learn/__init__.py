"""The router learns from its own traffic: decided cascades and client feedback become labelled exemplars
(`Learner`), a share of requests explores the cheapest tier (`Learner.explore`), and a candidate router runs
in shadow beside the live one (`ShadowRunner`)."""

from router.learn.config import LearnConfig, ShadowConfig
from router.learn.learner import LEARNED_SOURCE, Learner
from router.learn.types import Feedback, LearnResult, RequestOutcome, Verdict, key_id

__all__ = ["LEARNED_SOURCE", "Feedback", "LearnConfig", "LearnResult", "Learner", "RequestOutcome", "ShadowConfig",
           "Verdict", "key_id"]
