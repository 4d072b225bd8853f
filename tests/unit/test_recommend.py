"""The recommendation with a confidence column: the plain cascade unless cross-validation on train shows
another policy better with 95% confidence (`bootstrap.choose_policy`, `TrainedRouters.choice`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from router.eval.bootstrap import choose_policy
from router.eval.cascade import confidence_cascade
from router.eval.runner import TrainedRouters
from router.scoring import RandomRouter


def test_the_issues_table_recommends_the_cascade() -> None:
    # train APGRs and paired intervals like the issue's unseen set: nothing beats the cascade for sure
    values = {"cascade": 0.782, "knn": 0.468, "classifier": 0.430, "cascade+knn": 0.668,
              "cascade+classifier": 0.782, "cascade-learned": 0.742}
    cis = {"knn": (-0.40, -0.22), "classifier": (-0.42, -0.28), "cascade+knn": (-0.176, -0.048),
           "cascade+classifier": (-0.001, 0.0), "cascade-learned": (-0.081, -0.003)}
    choice = choose_policy(values, cis)
    assert choice.router == "cascade" and "95% confidence" in choice.reason
    # a learned policy whose whole interval is above 0 wins; higher APGR alone does not
    assert choose_policy({**values, "cascade-learned": 0.80}, {**cis, "cascade-learned": (-0.01, 0.05)}).router == "cascade"
    won = choose_policy({**values, "cascade-learned": 0.80}, {**cis, "cascade-learned": (0.004, 0.04)})
    assert won.router == "cascade-learned" and "+0.004" in won.reason


def _train(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    strong = (rng.random(n) < 0.85).astype(float)
    weak = np.where(strong == 1, (rng.random(n) < 0.7), (rng.random(n) < 0.2)).astype(float)
    confidence = np.clip(0.5 + 0.35 * (weak - 0.5) + 0.2 * rng.standard_normal(n), 0.01, 0.99)
    return pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "strong": strong, "weak": weak,
                         "weak_confidence": confidence}), confidence


def test_with_cascades_every_policy_is_weighed_against_the_cascade() -> None:
    train, confidence = _train(285, 0)
    strong, weak = train["strong"].to_numpy(), train["weak"].to_numpy()
    noise = np.random.default_rng(5).random(len(train))
    oracle = (strong - weak) + 0.01 * noise  # a policy that knows the answers: clearly better
    from router.eval.cascade import TrainedCascade

    cascades = {"cascade": TrainedCascade("cascade"), "cascade-learned": TrainedCascade("cascade-learned")}
    scores = {"random": noise, "heuristic": noise, "cascade": confidence_cascade(confidence).score,
              "cascade-learned": 1 - confidence + 0.3 * noise}
    trained = TrainedRouters({"random": RandomRouter(), "heuristic": RandomRouter()}, scores, {}, cascades)
    assert trained.choice(train).router == "cascade"
    trained.train_scores["cascade-learned"] = oracle
    assert trained.choice(train).router == "cascade-learned"
