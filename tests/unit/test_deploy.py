"""The deployment manifests (deploy/), the TorchServe metrics and logging configuration.

No cluster runs here: the manifests are parsed, checked against each other and against
config/config.properties, serve.sh and the Dockerfile, and validated against Kubernetes'
own schemas (kubernetes-validate ships them, so this works offline).
"""

import copy
import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import load_properties

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
IMAGE = "ghcr.io/whisper-torchserve/whisper-torchserve:latest"
MODEL_NAME = "whisper"
# Kubernetes versions the built-in objects are validated against: an older supported one and
# the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


# ---------------------------------------------------------------- loading




def port_of(address: str) -> int:
    return urlparse(address).port


def host_of(address: str) -> str:
    return urlparse(address).hostname


def yaml_files():
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def all_documents():
    """(path, document) for every YAML document under deploy/."""
    docs = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def objects(kind=None):
    """Kubernetes objects (not kustomizations, not Helm values) under deploy/."""
    found = [
        (path, doc)
        for path, doc in all_documents()
        if "kind" in doc and doc["kind"] != "Kustomization"
    ]
    return [(p, d) for p, d in found if kind is None or d["kind"] == kind]


def one(kind, directory=None):
    matches = [d for p, d in objects(kind) if directory is None or p.parent.name == directory]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def pod_spec(obj) -> dict:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "ServingRuntime":
        return obj["spec"]
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    raise ValueError(obj["kind"])


def containers(obj):
    return pod_spec(obj).get("containers", [])


@pytest.fixture(scope="module")
def ts_props():
    return load_properties(REPO / "config" / "config.properties")


@pytest.fixture(scope="module")
def kserve_props():
    return load_properties(DEPLOY / "kserve" / "config" / "config.properties")


@pytest.fixture(scope="module")
def dockerfile():
    return (REPO / "Dockerfile").read_text()


# ---------------------------------------------------------------- structure


def test_every_yaml_document_parses_and_names_itself():
    docs = all_documents()
    assert docs, "no YAML under deploy/"
    kinds = {d.get("kind") for _, d in docs}
    for expected in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "InferenceService", "ServingRuntime", "Kustomization"):
        assert expected in kinds, f"no {expected} under deploy/"
    for path, doc in objects():
        where = f"{path.relative_to(REPO)} ({doc.get('kind')})"
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
        assert isinstance(doc.get("kind"), str) and doc["kind"], where
        name = (doc.get("metadata") or {}).get("name")
        assert name and DNS_LABEL.match(name), f"{where}: metadata.name {name!r}"
        assert isinstance(doc.get("spec"), dict) and doc["spec"], f"{where}: no spec"
        # namespaces are chosen at apply time (kubectl -n / kustomize namespace:)
        assert "namespace" not in doc["metadata"], where


@pytest.mark.parametrize(
    "kind, api_version",
    [
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("PodDisruptionBudget", "policy/v1"),
        ("InferenceService", "serving.kserve.io/v1beta1"),
        ("ServingRuntime", "serving.kserve.io/v1alpha1"),
        ("PodMonitor", "monitoring.coreos.com/v1"),
    ],
)
def test_api_versions(kind, api_version):
    for path, doc in objects(kind):
        assert doc["apiVersion"] == api_version, path


def test_kustomizations_list_their_manifests_and_define_the_image_once():
    kustomizations = [(p, d) for p, d in all_documents() if d.get("kind") == "Kustomization"]
    assert {p.parent.name for p, _ in kustomizations} == {"k8s", "kserve"}
    name, tag = IMAGE.rsplit(":", 1)
    for path, kust in kustomizations:
        for resource in kust["resources"]:
            assert (path.parent / resource).is_file(), f"{path}: missing {resource}"
        assert kust["images"] == [{"name": name, "newTag": tag}], path
    # every object of deploy/k8s is applied by its kustomization, except the PodMonitor,
    # which needs the Prometheus Operator's CRDs
    k8s = next(d for p, d in kustomizations if p.parent.name == "k8s")
    listed = set(k8s["resources"])
    for path, doc in objects():
        if path.parent == DEPLOY / "k8s" and doc["kind"] != "PodMonitor":
            assert path.name in listed, f"{path.name} not in deploy/k8s/kustomization.yaml"


def test_all_manifests_use_the_same_image():
    images = [(p, c["image"]) for p, d in objects() if d["kind"] in ("Deployment", "ServingRuntime")
              for c in containers(d)]
    assert images
    for path, image in images:
        assert image == IMAGE, f"{path}: {image}"
    # the InferenceService takes the image from the ServingRuntime, never its own
    isvc = one("InferenceService")
    assert "image" not in isvc["spec"]["predictor"]["model"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", ["k8s", "kserve"])
def test_kustomize_renders(directory):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / directory)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = list(yaml.safe_load_all(out.stdout))
    assert rendered and all(IMAGE in yaml.safe_dump(d) for d in rendered
                            if d["kind"] in ("Deployment", "ServingRuntime"))


def test_builtin_objects_match_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    # built-in API groups have no dots (v1, apps/v1, policy/v1); CRDs' groups do
    builtin = [(p, d) for p, d in objects() if "." not in d["apiVersion"].split("/")[0]]
    assert {d["kind"] for _, d in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                              "PodDisruptionBudget"}
    for path, doc in builtin:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = "/".join(str(x) for x in err.path)
                pytest.fail(f"{path.relative_to(REPO)} ({doc['kind']}) against Kubernetes {version}: "
                            f"{where}: {err.message}", pytrace=False)


def test_schema_validation_catches_a_typo():
    """The validation above is strict: an unknown field fails it."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- ports and probes


def test_ports_agree_with_config_properties(ts_props):
    inference, metrics, management = (port_of(ts_props[k]) for k in
                                      ("inference_address", "metrics_address", "management_address"))
    assert (inference, metrics, management) == (8080, 8082, 8081)
    deployment = one("Deployment")
    (container,) = containers(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert sorted(ports.values()) == [inference, metrics]

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics
    assert annotations["prometheus.io/path"] == "/metrics"

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/ping", probe
        assert ports.get(get["port"], get["port"]) == inference, probe
    # the first start may download weights and build whisper.mar: give it minutes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_service_exposes_inference_and_metrics_only(ts_props):
    deployment, service = one("Deployment"), one("Service")
    (container,) = containers(deployment)
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    targets = {by_name.get(p["targetPort"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {port_of(ts_props["inference_address"]), port_of(ts_props["metrics_address"])}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_management_port_is_never_exposed(ts_props, kserve_props):
    management = port_of(ts_props["management_address"])
    for props in (ts_props, kserve_props):
        assert host_of(props["management_address"]) == "127.0.0.1"
        assert port_of(props["management_address"]) == management
    for path, doc in objects():
        text = yaml.safe_dump(doc)
        for c in containers(doc) if doc["kind"] in ("Deployment", "ServingRuntime") else []:
            assert management not in [p["containerPort"] for p in c.get("ports", [])], path
        if doc["kind"] == "Service":
            for p in doc["spec"]["ports"]:
                assert management not in (p["port"], p.get("targetPort"), p.get("nodePort")), path
        assert f"{management}" not in re.findall(r"\b\d{4}\b", text), f"{path}: mentions {management}"


# ---------------------------------------------------------------- pods: GPU, env, security


def test_gpu_per_pod():
    for obj in (one("Deployment"), one("InferenceService")):
        if obj["kind"] == "Deployment":
            (container,) = containers(obj)
            resources = container["resources"]
        else:
            resources = obj["spec"]["predictor"]["model"]["resources"]
        for section in ("requests", "limits"):
            assert int(resources[section]["nvidia.com/gpu"]) == 1, obj["kind"]
            assert resources["requests"].get("cpu") and resources["requests"].get("memory")
        tolerations = pod_spec(obj).get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), obj["kind"]


def test_environment_sets_model_window_budget_and_one_worker_per_gpu():
    (container,) = containers(one("Deployment"))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["WHISPER_MODEL"]
    assert int(env["WHISPER_WINDOW_BUDGET"]) >= 0  # 0: sized from the GPU's memory
    assert env["WHISPER_WORKERS"] == "1"
    # every WHISPER_* variable is one the build reads (serve.sh, render_model_config.py)
    script = REPO / "model-archiver" / "render_model_config.py"
    spec = importlib.util.spec_from_file_location("render_model_config", script)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    known = {"WHISPER_MODEL", "WHISPER_DEVICE", "WHISPER_DRAIN_TIMEOUT_S", *render.ENV_OVERRIDES, *render.HANDLER_ENV}
    assert {name for name in env if name.startswith("WHISPER_")} <= known


def test_the_grace_period_covers_the_prestop_wait_and_the_drain():
    """Kubernetes kills the pod terminationGracePeriodSeconds after it begins to stop: the
    preStop wait (routing stops), then SIGTERM and serve.sh's drain (bounded by
    WHISPER_DRAIN_TIMEOUT_S, serve.sh's default unless the manifest sets it) must fit, with
    time left for TorchServe to stop; readiness reads /ping, which reports Draining."""
    deployment = one("Deployment")
    (container,) = containers(deployment)
    env = {e["name"]: e["value"] for e in container["env"]}
    default = re.search(r'DRAIN_TIMEOUT="\$\{WHISPER_DRAIN_TIMEOUT_S:-(\d+)\}"', (REPO / "serve.sh").read_text())
    drain_s = int(env.get("WHISPER_DRAIN_TIMEOUT_S", default.group(1)))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(command[1]) + drain_s + 30, (grace, command, drain_s)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"


def test_security_context_is_non_root(dockerfile):
    uid = int(re.search(r"useradd\b[^\n]*--uid (\d+)", dockerfile).group(1))
    assert uid != 0
    for kind in ("Deployment", "ServingRuntime", "InferenceService"):
        obj = one(kind)
        pod = pod_spec(obj).get("securityContext", {})
        for c in containers(obj):
            ctx = {**pod, **c.get("securityContext", {})}
            assert ctx["runAsNonRoot"] is True, kind
            assert ctx["runAsUser"] == uid, kind
            assert ctx["allowPrivilegeEscalation"] is False, kind
            assert ctx.get("privileged", False) is False, kind
            assert ctx["capabilities"]["drop"] == ["ALL"], kind
            assert not ctx["capabilities"].get("add"), kind
        if kind == "InferenceService":
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid
    assert one("Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---------------------------------------------------------------- autoscaling


@pytest.fixture(scope="module")
def adapter_rules():
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    return values["rules"]["custom"]


@pytest.fixture(scope="module")
def metrics_config():
    return yaml.safe_load((REPO / "config" / "metrics.yaml").read_text())


def test_hpa_targets_the_deployment():
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_hpa_metric_comes_from_the_adapter_rule(adapter_rules, metrics_config):
    hpa = one("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    (rule,) = [r for r in adapter_rules if r["name"]["as"] == name]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # it reads the handler's histogram of the wait for a first window (config/metrics.yaml):
    # with the asynchronous worker, requests wait in the engine, not in TorchServe's queue
    histograms = {m["name"] for m in metrics_config["model_metrics"]["histogram"]}
    series = set(re.findall(r"\b([A-Za-z]+)_(?:sum|count)\{", rule["seriesQuery"] + rule["metricsQuery"]))
    assert series == {"FirstWindowWait"} and series <= histograms
    assert re.match(rule["name"]["matches"], re.match(r"(\w+)\{", rule["seriesQuery"]).group(1))
    assert f'ModelName="{MODEL_NAME}"' in rule["metricsQuery"]
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_pdb_covers_the_deployment_pods():
    pdb, deployment = one("PodDisruptionBudget"), one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # maxUnavailable (not minAvailable: 1) so that a single replica never blocks node drains
    assert pdb["spec"]["maxUnavailable"] == 1


def test_podmonitor_scrapes_the_metrics_port():
    monitor, deployment = one("PodMonitor"), one("Deployment")
    (container,) = containers(deployment)
    names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert names[endpoint["port"]] == 8082 and endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- KServe


def test_inference_service_uses_the_torchserve_runtime():
    isvc, runtime = one("InferenceService"), one("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "pytorch"}
    assert model["protocolVersion"] == "v1"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert urlparse(model["storageUri"]).scheme in ("s3", "gs", "pvc", "https", "hdfs", "azure")
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert "pytorch" in formats and "v1" in runtime["spec"]["protocolVersions"]
    # long transcriptions: the request timeout is TorchServe's, not Knative's 300 s default
    assert isvc["spec"]["predictor"]["timeout"] >= 900


def test_serving_runtime_starts_torchserve_on_the_kserve_layout(kserve_props, dockerfile):
    runtime = one("ServingRuntime")
    (container,) = containers(runtime)
    assert container["name"] == "kserve-container"
    args = container["args"]
    assert "--foreground" in args
    assert "--model-store=/mnt/models/model-store" in args
    assert "--ts-config=/mnt/models/config/config.properties" in args
    (port,) = container["ports"]
    assert port["containerPort"] == port_of(kserve_props["inference_address"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": port["containerPort"]}
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == port_of(kserve_props["metrics_address"])
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    # files the runtime and its config name inside the image exist in the repository
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1).rstrip("/")
    log_config = next(a.split("=", 1)[1] for a in args if a.startswith("--log-config="))
    for in_image in (log_config, kserve_props["metrics_config"]):
        assert in_image.startswith(workdir + "/"), in_image
        assert (REPO / in_image[len(workdir) + 1:]).is_file(), in_image


def test_kserve_config_properties_has_what_kserve_needs(kserve_props, ts_props):
    props = kserve_props
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["enable_metrics_api"] == "true"
    assert props["metrics_mode"] == "prometheus"
    assert props["enable_envvars_config"] == "true"
    # TorchServe >= 0.11.1 wants a token on every call unless told otherwise; KServe sends none
    assert props["disable_token_authorization"] == "true"
    assert props["enable_model_api"] == "false"
    assert host_of(props["inference_address"]) == "0.0.0.0"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    (version,) = snapshot["models"][MODEL_NAME].values()
    assert version["marName"] == f"{MODEL_NAME}.mar" and version["defaultVersion"] is True
    # the snapshot's values override the archive's model-config.yaml: they must be the same
    model_config = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
    for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"):
        assert version[key] == model_config[key], key
    assert version["minWorkers"] == version["maxWorkers"] == 1
    assert version["batchSize"] == 1 and model_config["asyncCommunication"] is True
    assert version["responseTimeout"] >= 900
    # the same limits as the plain server
    for key in ("max_request_size", "max_response_size", "default_response_timeout", "job_queue_size"):
        assert props[key] == ts_props[key], key


def test_model_name_and_archive_agree_with_serve_sh():
    serve = (REPO / "serve.sh").read_text()
    assert f"--models {MODEL_NAME}={MODEL_NAME}.mar" in serve


def test_storage_layout_is_documented():
    readme = (DEPLOY / "README.md").read_text()
    for needle in ("config/config.properties", "model-store/whisper.mar", "./serve.sh --prepare",
                   "deploy/kserve/config/config.properties", "/v1/models/whisper:predict"):
        assert needle in readme, needle
    header = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    assert "config/config.properties" in header and "model-store/whisper.mar" in header


# ---------------------------------------------------------------- config/metrics.yaml

CUSTOM_METRICS = {
    # name: (type, unit, extra dimensions)
    "AudioSecondsProcessed": ("counter", "Seconds", []),
    "RealTimeFactor": ("gauge", None, []),
    "InflightRequests": ("gauge", None, []),
    "InflightStreams": ("gauge", None, []),
    "WindowsPerStep": ("histogram", None, []),
    "StepTime": ("histogram", "ms", []),
    "FirstWindowWait": ("histogram", "ms", []),
    "FallbackCount": ("counter", None, []),
    "RequestErrors": ("counter", None, ["ErrorType"]),
}


def metric_entries(section: dict):
    return {m["name"]: (kind, m) for kind, entries in section.items() for m in entries}


def test_metrics_config_declares_the_handler_metrics(metrics_config):
    model = metric_entries(metrics_config["model_metrics"])
    for name, (kind, unit, extra) in CUSTOM_METRICS.items():
        assert name in model, name
        declared_kind, entry = model[name]
        assert declared_kind == kind, name
        if unit:
            assert entry["unit"] == unit, name
        # ModelName and Level first (what TorchServe's backend adds by default), in that order
        assert entry["dimensions"] == ["ModelName", "Level", *extra], name


def test_every_metric_the_handler_emits_is_declared(metrics_config):
    """TorchServe drops a metric that config/metrics.yaml does not declare."""
    source = (REPO / "handler" / "whisper_handler.py").read_text()
    emitted = set(re.findall(r'_emit\(\s*"(\w+)",\s*MetricTypes\.(\w+)', source))
    assert {name for name, _ in emitted} == set(CUSTOM_METRICS)
    model = metric_entries(metrics_config["model_metrics"])
    for name, metric_type in emitted:
        assert model[name][0] == metric_type.lower(), name


def test_metrics_config_is_what_torchserve_accepts(metrics_config):
    assert set(metrics_config) == {"dimensions", "ts_metrics", "model_metrics"}
    names = []
    for section in ("ts_metrics", "model_metrics"):
        assert set(metrics_config[section]) <= {"counter", "gauge", "histogram"}
        for kind, entries in metrics_config[section].items():
            for entry in entries:
                assert set(entry) == {"name", "unit", "dimensions"}, entry
                # the frontend's metric-line parser: names and units are \w (and spaces)
                assert re.fullmatch(r"\w+", entry["name"]) and re.fullmatch(r"[\w ]+", entry["unit"])
                names.append(entry["name"])
                if section == "model_metrics":
                    # the frontend appends Hostname to every model metric itself
                    assert "Hostname" not in entry["dimensions"], entry["name"]
    assert len(names) == len(set(names)), "metric names must be unique (matched by name only)"


def test_metrics_config_keeps_torchserve_defaults(metrics_config):
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchserve not installed")
    default_path = Path(list(spec.submodule_search_locations)[0]) / "configs" / "metrics.yaml"
    default = yaml.safe_load(default_path.read_text())
    for section in ("ts_metrics", "model_metrics"):
        ours = metric_entries(metrics_config[section])
        for name, (kind, entry) in metric_entries(default[section]).items():
            assert ours.get(name) == (kind, entry), f"{section}.{name} differs from TorchServe's default"


# ---------------------------------------------------------------- config/log4j2.xml

LOGS = ("access_log", "model_log", "ts_log", "model_metrics", "ts_metrics")


@pytest.fixture(scope="module")
def log4j():
    return ET.parse(REPO / "config" / "log4j2.xml").getroot()


def test_log4j_rolls_every_log_with_a_cap(log4j):
    appenders = {a.get("name"): a for a in log4j.find("Appenders").findall("RollingFile")}
    assert set(LOGS) <= set(appenders)
    for name in LOGS:
        appender = appenders[name]
        directory = ("${env:METRICS_LOCATION:-${env:LOG_LOCATION:-logs}}" if name.endswith("metrics")
                     else "${env:LOG_LOCATION:-logs}")
        assert appender.get("fileName") == f"{directory}/{name}.log"
        pattern = appender.get("filePattern")
        assert pattern.startswith(f"{directory}/{name}.") and pattern.endswith(".log.gz")
        # %i: several size rollovers on one day get distinct names instead of overwriting
        assert "%i" in pattern and "%d{" in pattern
        policies = appender.find("Policies")
        assert policies.find("SizeBasedTriggeringPolicy").get("size") == "100 MB"
        assert policies.find("TimeBasedTriggeringPolicy") is not None
        strategy = appender.find("DefaultRolloverStrategy")
        assert 1 <= int(strategy.get("max")) <= 20
        delete = strategy.find("Delete")
        assert delete.get("basePath") == directory
        glob = delete.find("IfFileName").get("glob")
        assert fnmatch.fnmatch(f"{name}.2026-01-31.3.log.gz", glob)
        assert not fnmatch.fnmatch(f"{name}.log", glob)
        cap = delete.find(".//IfAccumulatedFileCount")
        assert cap is not None and int(cap.get("exceeds")) <= 20


def test_log4j_loggers_are_torchserves(log4j):
    appenders = {a.get("name") for a in log4j.find("Appenders")}
    loggers = {lg.get("name"): lg for lg in log4j.find("Loggers").findall("Logger")}
    for name in ("ACCESS_LOG", "MODEL_LOG", "MODEL_METRICS", "TS_METRICS", "org.pytorch.serve"):
        assert name in loggers, name
    refs = [r.get("ref") for r in log4j.find("Loggers").iter("AppenderRef")]
    assert refs and set(refs) <= appenders
    assert {"STDOUT", "ts_log"} <= {r.get("ref") for r in log4j.find("Loggers").find("Root")}
