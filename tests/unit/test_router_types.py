"""Router value types: idempotent exemplar ids, request validation, RouteLLM-style model names."""

from __future__ import annotations

import pytest

from router.types import Exemplar, RouteInput, parse_router_model


def test_exemplar_id_ignores_case_and_whitespace_but_not_words():
    a = Exemplar("Extract  the date\n", "small")
    assert a.id == Exemplar("extract the DATE", "large").id
    assert a.text_hash == Exemplar(" extract the date", "small").text_hash
    assert a.id != Exemplar("extract the time", "small").id


def test_router_model_names():
    assert parse_router_model("router-knn-0.62") == ("knn", 0.62)
    assert parse_router_model("router-heuristic") == ("heuristic", None)
    with pytest.raises(ValueError, match="router-<knn|heuristic|cheapest>"):
        parse_router_model("router-bert-0.5")
    with pytest.raises(ValueError, match="must be within"):
        parse_router_model("router-knn-1.5")
    with pytest.raises(ValueError, match="not a number"):
        parse_router_model("router-knn-high")


def test_route_input_rejects_bad_knobs():
    with pytest.raises(ValueError, match=r"threshold \(-0.1\)"):
        RouteInput("hi", threshold=-0.1)
    with pytest.raises(ValueError, match="router 'bert'"):
        RouteInput("hi", router="bert")


def test_a_fallback_says_whether_the_router_was_busy():
    from router.config import RouterConfig
    from router.scoring import Decider
    from router.types import BUSY_CAUSE

    decider = Decider(RouterConfig(), ["small", "large"])
    busy = decider.fallback(RouteInput("Summarise this."), BUSY_CAUSE)
    down = decider.fallback(RouteInput("Summarise this."), "store")
    assert busy.fallback and busy.busy and busy.fallback_cause == BUSY_CAUSE and busy.router == "heuristic"
    assert down.fallback and not down.busy and down.fallback_cause == "store"
    assert not decider.decide(RouteInput("x"), "knn", 0.2, "knn").busy
