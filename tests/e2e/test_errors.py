"""Every error case answers with its status and OpenAI's error envelope."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import ADMIN_KEY, API_KEY

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "hi"}]


def _post(base_url: str, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        return httpx.post(base_url + path, content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(base_url + path, json=body, headers=headers, timeout=60)


def _envelope(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-17", messages=MSG)
    assert exc.value.status_code == 404
    assert exc.value.body["param"] == "model"
    assert "gpt-17" in exc.value.body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "small", "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": "small", "messages": []}, "messages"),
        ({"model": "small", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "small", "messages": MSG, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"model": "small", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": MSG}, "model"),
        ({"model": "small", "messages": MSG, "n": 3}, "n"),
    ],
)
def test_invalid_field_is_400_naming_it(base_url: str, body: dict, param: str) -> None:
    r = _post(base_url, "/v1/chat/completions", body)
    assert r.status_code == 400
    err = _envelope(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert param.split(".")[0] in err["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/route"])
def test_malformed_json_is_400(base_url: str, path: str) -> None:
    r = _post(base_url, path, "{not json")
    assert r.status_code == 400
    assert _envelope(r)["param"] == "body"


def test_prompt_longer_than_context_is_400_with_both_numbers(client: openai.OpenAI, stack: dict) -> None:
    limit = stack["config"].tier("small").engine.max_model_len
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="small", prompt="word " * (limit + 50), max_tokens=10)
    body = exc.value.body
    assert body["code"] == "context_length_exceeded"
    assert str(limit) in body["message"]
    requested = int(body["message"].split("you requested ")[1].split(" tokens")[0])
    assert requested > limit


def test_context_error_also_for_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "w " * 2000}], stream=True)


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_wrong_api_key_is_401(base_url: str, key: str | None) -> None:
    r = _post(base_url, "/v1/chat/completions", {"model": "small", "messages": MSG}, key=key)
    assert r.status_code == 401
    assert _envelope(r)["type"] == "authentication_error"
    assert httpx.get(base_url + "/v1/models").status_code == 401


@pytest.mark.parametrize("path", ["/admin/exemplars", "/admin/router/release-store"])
def test_admin_endpoints_need_an_admin_key(base_url: str, path: str) -> None:
    body = {"exemplars": [{"text": "x", "tier": "giant"}]} if path == "/admin/exemplars" else {"seconds": -1}
    assert _post(base_url, path, body, key=None).status_code == 401
    data_key = _post(base_url, path, body, key=API_KEY)
    assert data_key.status_code == 403
    err = _envelope(data_key)
    assert err["type"] == "permission_error" and "admin" in err["message"]
    # The admin key passes authorization and reaches validation (this body is invalid on purpose).
    assert _post(base_url, path, body, key=ADMIN_KEY).status_code == 400
    # It also works on the data plane; /health stays open and /metrics is open by default.
    assert httpx.get(base_url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert httpx.get(base_url + "/health").status_code == 200
    assert httpx.get(base_url + "/metrics").status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"model": "small", "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]}, "body", 413),
        ({"model": "small", "messages": MSG * 1025}, "messages", 400),
        ({"model": "small", "messages": MSG, "max_tokens": 10**6}, "max_tokens", 400),
        ({"model": "small", "messages": MSG, "max_completion_tokens": 10**6}, "max_completion_tokens", 400),
        ({"model": "small", "messages": MSG, "stop": [f"s{i}" for i in range(17)]}, "stop", 400),
        ({"model": "small", "messages": MSG, "stop": "x" * 513}, "stop", 400),
        ({"model": "small", "messages": MSG, "stop": ""}, "stop", 400),
        ({"model": "small", "messages": MSG, "top_logprobs": 21, "logprobs": True}, "top_logprobs", 400),
    ],
)
def test_limits_are_refused_before_engine_work(base_url: str, body: dict, param: str, status: int) -> None:
    r = _post(base_url, "/v1/chat/completions", body)
    assert r.status_code == status, r.text[:300]
    err = _envelope(r)
    assert err["param"] == param
    assert param.split(".")[0] in err["message"] or status == 413


def test_metrics_count_requests_by_tier_and_status(base_url: str, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="large", messages=MSG, max_tokens=2)
    list(client.chat.completions.create(model="large", messages=MSG, max_tokens=4, stream=True,
                                        extra_body={"ignore_eos": True}))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    text = httpx.get(base_url + "/metrics").text
    assert 'tierserve_requests_total{endpoint="chat",status="200",tier="large"}' in text
    assert 'tierserve_requests_total{endpoint="chat",status="404",tier="none"}' in text
    assert 'tierserve_tokens_total{kind="completion",tier="large"}' in text
    assert "tierserve_engine_kv_cache_usage_ratio" in text
    tpot = [line for line in text.splitlines()
            if line.startswith('tierserve_time_per_output_token_seconds_count{tier="large"}')]
    assert tpot and float(tpot[0].rsplit(" ", 1)[1]) >= 1
