"""Errors keep their status, fields and headers across process boundaries and map to OpenAI's envelope."""

from __future__ import annotations

import pickle

import pytest

from serving.channel.errors import Overloaded, ServiceUnavailable
from serving.engines.base import EngineError, prompt_too_long
from serving.ingress.errors import (
    ModelNotFound,
    Unauthorized,
    find_tierserve_error,
    to_envelope,
)


def test_context_error_names_both_numbers_and_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(prompt_too_long(600, 10, 512, "small")))
    status, body, headers = to_envelope(err)
    assert status == 400 and headers == {}
    assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
    assert "512 tokens" in body["error"]["message"] and "610 tokens" in body["error"]["message"]


@pytest.mark.parametrize(("status", "cls"), [(429, Overloaded), (503, ServiceUnavailable)])
def test_overload_carries_retry_after(status: int, cls: type) -> None:
    err = pickle.loads(pickle.dumps(Overloaded.make("full", retry_after_s=2.6, status_code=status)))
    assert type(err) is cls
    code, body, headers = to_envelope(err)
    assert code == status and headers == {"Retry-After": "3"} and body["error"]["code"] == "overloaded"
    assert to_envelope(Overloaded.make("full", retry_after_s=0.1))[2] == {"Retry-After": "1"}


def test_statuses_and_types() -> None:
    assert to_envelope(ModelNotFound("no", param="model"))[:2] == (
        404, {"error": {"message": "no", "type": "not_found_error", "param": "model", "code": None}}
    )
    assert to_envelope(Unauthorized("key"))[0] == 401
    assert to_envelope(EngineError("boom"))[0] == 500


def test_unknown_errors_become_500_and_wrapped_ones_are_found() -> None:
    status, body, _ = to_envelope(RuntimeError("kaput"))
    assert status == 500 and "RuntimeError: kaput" in body["error"]["message"]

    class Wrapper(Exception):  # shaped like Ray's RayTaskError: the cause in `.cause`
        def __init__(self, cause: BaseException) -> None:
            super().__init__(str(cause))
            self.cause = cause

    inner = ModelNotFound("gone", param="model")
    assert find_tierserve_error(Wrapper(inner)) is inner
    assert to_envelope(Wrapper(inner))[0] == 404


def test_vllm_validation_errors_become_400s_naming_the_field() -> None:
    from vllm.exceptions import VLLMValidationError

    from serving.engines.vllm import _client_error

    err = _client_error(VLLMValidationError("stop cannot contain an empty string."))
    assert (err.status_code, err.param) == (400, "stop") and "empty string" in err.message
    err = _client_error(VLLMValidationError("must be positive", parameter="seed", value=-1))
    assert err.param == "seed"


def test_an_empty_stop_string_is_refused_before_any_engine_work() -> None:
    import pydantic

    from serving.ingress.protocol import CompletionRequest

    for stop in ("", ["ok", ""]):
        with pytest.raises(pydantic.ValidationError, match="stop strings must not be empty"):
            CompletionRequest.model_validate({"model": "small", "prompt": "x", "stop": stop})
    assert CompletionRequest.model_validate({"model": "small", "prompt": "x", "stop": ["a"]}).stop_tuple() == ("a",)
