"""The embedder's device settings: CUDA only with the torch backend and a GPU share, refused clearly without CUDA."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.config import EmbedderConfig, RouterConfig
from router.embed.flag import check_device
from router.errors import ConfigError, EmbedderDeviceError


def test_cuda_without_a_gpu_share_names_num_gpus():
    with pytest.raises(ValidationError, match=r"num_gpus is 0: Ray hides the GPUs"):
        RouterConfig(embedder=EmbedderConfig(device="cuda", use_fp16=True))
    cfg = RouterConfig(num_gpus=0.1, embedder=EmbedderConfig(device="cuda:0", use_fp16=True))
    assert cfg.embedder.device == "cuda:0" and cfg.embedder.backend == "torch"


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8", "static"])
def test_cpu_backends_are_refused_on_cuda(backend):
    with pytest.raises(ValidationError, match=rf"backend '{backend}' runs on CPU only.*use backend 'torch' on a GPU"):
        EmbedderConfig(device="cuda", backend=backend)


def test_device_names_are_checked():
    with pytest.raises(ValidationError, match="device"):
        EmbedderConfig(device="gpu")


def test_missing_cuda_is_a_config_error_naming_the_field():
    with pytest.raises(EmbedderDeviceError, match=r"router\.embedder\.device is 'cuda'.*set router\.num_gpus") as err:
        check_device("cuda", cuda_available=False)
    assert isinstance(err.value, ConfigError) and err.value.param == "router.embedder.device"
    check_device("cuda:0", cuda_available=True)
    check_device("cpu", cuda_available=False)


def test_building_a_cuda_embedder_on_a_machine_without_cuda_fails_before_loading():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; tests/gpu covers the embedder there")
    from router.embed import build_embedder

    with pytest.raises(EmbedderDeviceError, match="torch sees no CUDA device"):
        build_embedder(EmbedderConfig(device="cuda", use_fp16=True))


def test_static_settings():
    cfg = EmbedderConfig(backend="static", static_dims=128)
    assert cfg.vector_space == "static128"
    assert EmbedderConfig(backend="onnx").vector_space == ""  # the model's own vectors: one collection
    with pytest.raises(ValidationError, match="static_dims"):
        EmbedderConfig(backend="static", static_dims=4)
