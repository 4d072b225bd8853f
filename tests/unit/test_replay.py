"""Replay's stream: the learner and the store learn, from confidence alone, which prompts escalate, and
each row is scored before it is learned (out of sample)."""

from __future__ import annotations

import numpy as np

from router.config import KnnConfig
from router.eval.replay import matched, operate, stream
from router.learn import LearnConfig


def test_the_stream_learns_which_prompts_escalate_from_confidence_alone(tmp_path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    hard = rng.random(n) < 0.3
    centers = np.where(hard[:, None], np.eye(8)[0], np.eye(8)[1])
    vectors = (centers + 0.2 * rng.standard_normal((n, 8))).astype(np.float32)
    conf = np.where(hard, rng.uniform(0.1, 0.5, n), rng.uniform(0.6, 1.0, n))
    texts = [f"prompt {i}" for i in range(n)]
    learn = LearnConfig(enabled=True, sample_accepted=1.0, explore_rate=0.1, max_per_label=10**6,
                        max_per_key=10**6, max_key_share=1.0)
    run = stream(texts, vectors, conf, threshold=0.55, tau=0.7, learn=learn, knn=KnnConfig(k=10),
                 flush_every=50, store_dir=str(tmp_path / "q"))
    try:
        assert run.scores[:50].max() == 0.0  # nothing learned before the first flush
        late = slice(200, n)
        assert run.scores[late][hard[late]].mean() > 0.8 > 0.2 > run.scores[late][~hard[late]].mean()
        assert run.learned["learned"] > 0 and run.store.versions()[-1].kind == "learn"
    finally:
        run.store.close()
    strong, weak = np.ones(n), (~hard).astype(float)
    base = operate(None, None, 0.55, conf, strong, weak, 0.1)
    point = matched(run.scores, 0.7, conf, strong, weak, 0.1, base.quality)
    assert point.quality >= base.quality and point.wasted < base.wasted and point.cost < base.cost
