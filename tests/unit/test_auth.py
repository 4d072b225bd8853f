"""API-key scopes, key sources and request limits: the pure checks the ingress runs before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.errors import ConfigError, InvalidRequest
from serving.config import LimitsConfig, parse_config
from serving.ingress.errors import Forbidden, Unauthorized
from serving.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Keys,
    Scope,
    check_limits,
)

MIN_CONFIG = {"device": "gpu", "tiers": [{"name": "small", "model": "m", "resources": {"num_gpus": 1}}]}


def test_no_key_configured_means_open() -> None:
    keys = Keys(set(), set())
    keys.check(None, Scope.DATA)
    keys.check(None, Scope.ADMIN)


def test_data_key_opens_the_data_plane_but_not_admin() -> None:
    keys = Keys({"sk-data"}, {"sk-admin"})
    keys.check("Bearer sk-data", Scope.DATA)
    keys.check("Bearer sk-admin", Scope.DATA)
    keys.check("bearer  sk-admin ", Scope.ADMIN)
    with pytest.raises(Forbidden, match="no admin scope"):
        keys.check("Bearer sk-data", Scope.ADMIN)
    for bad in (None, "", "Bearer", "Bearer sk-dat", "Bearer sk-data2", "Basic sk-data", "sk-data"):
        with pytest.raises(Unauthorized):
            keys.check(bad, Scope.DATA)


def test_admin_is_closed_when_only_data_keys_exist() -> None:
    keys = Keys({"sk-data"}, set())
    with pytest.raises(Forbidden, match="no admin key is configured"):
        keys.check("Bearer sk-data", Scope.ADMIN)


def test_keys_come_from_config_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api_file = tmp_path / "api"
    api_file.write_text("sk-file-1\n\n  sk-file-2  \n")
    admin_file = tmp_path / "admin"
    admin_file.write_text("sk-admin-file\n")
    monkeypatch.setenv("TIERSERVE_API_KEYS", "sk-env-1, sk-env-2")
    monkeypatch.setenv("TIERSERVE_ADMIN_KEYS", "sk-admin-env")
    config = parse_config({**MIN_CONFIG, "http": {"api_keys": ["sk-cfg"], "api_keys_file": str(api_file),
                                                  "admin_keys": ["sk-admin-cfg"], "admin_keys_file": str(admin_file)}})
    assert config.api_keys() == {"sk-cfg", "sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"}
    assert config.admin_keys() == {"sk-admin-cfg", "sk-admin-env", "sk-admin-file"}


def test_missing_key_file_names_the_field(tmp_path: Path) -> None:
    config = parse_config({**MIN_CONFIG, "http": {"admin_keys_file": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="http.admin_keys_file"):
        config.admin_keys()


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "small", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (_chat(messages=[{"role": "user", "content": "hi"}] * 5), "messages"),
        (_chat(max_tokens=101), "max_tokens"),
        (_chat(max_completion_tokens=101), "max_completion_tokens"),
        (_chat(stop=["a", "b", "c"]), "stop"),
        (_chat(stop="x" * 11), "stop"),
        (CompletionRequest.model_validate({"model": "small", "prompt": "p", "max_tokens": 101}), "max_tokens"),
    ],
)
def test_limits_name_the_field(request_, param: str) -> None:
    limits = LimitsConfig(max_messages=4, max_tokens=100, max_stop=2, max_stop_chars=10)
    with pytest.raises(InvalidRequest) as exc:
        check_limits(request_, limits)
    assert exc.value.param == param and param in exc.value.message


def test_requests_within_limits_pass() -> None:
    limits = LimitsConfig(max_messages=4, max_tokens=100, max_stop=2, max_stop_chars=10)
    check_limits(_chat(max_tokens=100, stop=["a", "0123456789"], messages=[{"role": "user", "content": "hi"}] * 4),
                 limits)
