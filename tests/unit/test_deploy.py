"""deploy/: the Dockerfile, the compose stack and the Kubernetes manifests, checked statically.

No Docker engine or cluster is needed: compose.yaml is validated against the Compose
Specification's JSON schema (shipped by check-jsonschema), the kustomize output (`kubectl
kustomize`, the same rendering as `kubectl apply -k`) against the Kubernetes JSON schemas
(kubernetes-validate) and the Prometheus Operator CRDs' requirements, and every place where
the files must agree with the code is compared with the code itself: environments parse with
Settings/WorkerSettings, probes name real routes, ports and job names line up, mounted paths
exist.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.resources
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway import config as gateway_config
from gateway.app import create_app
from gateway.config import Settings
from workers import config as worker_config
from workers.config import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S_DIR = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sluice.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

KNOWN_ENV = set(gateway_config.VARIABLES) | set(worker_config.VARIABLES) | {
    "PROMETHEUS_MULTIPROC_DIR"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.utils.latest_version()]
IMAGE_UID = 10001  # USER in the Dockerfile, runAsUser in the pods
CATALOGUE_MOUNT = "/etc/sluice/catalogue"


def _settings_for(argv: list[str], env: dict[str, str]) -> Settings | WorkerSettings:
    """The settings object the process started by ``argv`` builds from ``env``."""
    assert not set(env) - KNOWN_ENV, [n for n in env if n not in KNOWN_ENV]
    if argv[0] == "sluice-worker":
        return WorkerSettings.from_env(env)
    assert argv[0] == "sluice", argv
    return Settings.from_env(env)


@functools.cache
def _gateway_routes() -> frozenset[str]:
    """GET routes of the real gateway application (nothing is started)."""
    app = create_app(Settings.from_env({"SLUICE_CATALOGUE_DIR": str(ROOT / "schemas/examples")}))
    return frozenset(r.resource.canonical for r in app.router.routes()
                     if r.method == "GET" and r.resource is not None)


def _job_matchers(text: str) -> set[str]:
    """Job names that label matchers in PromQL (or a JSON string of it) ask for."""
    jobs = set()
    for op, value in re.findall(r'job\s*(=~|=)\s*\\?"([^"\\]+)', text):
        jobs |= set(value.split("|")) if op == "=~" else {value}
    return jobs


# --- the image -----------------------------------------------------------------------------

def _dockerfile() -> list[tuple[str, str]]:
    lines = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines
            if ln.strip() and not ln.lstrip().startswith("#")]


def _in_build_context(path: str) -> bool:
    """Whether .dockerignore lets ``path`` (relative to the repo root) into the context."""
    included = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            included = negate
    return included


def test_dockerfile_installs_the_project_from_the_repo_root_as_a_non_root_user():
    instructions = _dockerfile()
    base = next(arg for op, arg in instructions if op == "FROM")
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    copied = []
    for op, arg in instructions:
        if op == "COPY":
            sources = shlex.split(arg)[:-1]
            copied += sources
            for source in sources:
                assert (ROOT / source).exists(), source
                assert _in_build_context(source), f"{source} is excluded by .dockerignore"
    assert not _in_build_context("tests/unit/test_deploy.py")
    assert not _in_build_context(".venv/bin/python")
    project = _toml()
    assert project["project"]["readme"] in copied
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied), packages - set(copied)
    assert any(op == "RUN" and "pip install" in arg for op, arg in instructions)
    user = [arg for op, arg in instructions if op == "USER"][-1]
    assert user.split(":")[0] == str(IMAGE_UID) != "0"
    assert json.loads(next(arg for op, arg in instructions if op == "ENTRYPOINT")) == ["sluice"]
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert f"SLUICE_CATALOGUE_DIR={CATALOGUE_MOUNT}" in env


def _toml() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- docker compose --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not NAME=value"
            env[name.strip()] = value.strip()
    return env


def _service_env(service: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for name in service.get("env_file", []):
        env.update(_env_file(COMPOSE_DIR / name))
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def _sluice_services(compose: dict) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Services running the Sluice image: name -> (argv, environment)."""
    out = {}
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("sluice"):
            argv = service.get("entrypoint", ["sluice"]) + service.get("command", [])
            out[name] = (argv, _service_env(service))
    return out


def _container_ports(compose: dict, name: str) -> set[int]:
    """Ports a service listens on inside the compose network."""
    service = compose["services"][name]
    ports = {int(str(p).split(":")[-1]) for p in service.get("ports", [])}
    ports |= {int(p) for p in service.get("expose", [])}
    if name in _sluice_services(compose):
        settings = _settings_for(*_sluice_services(compose)[name])
        ports.add(settings.metrics_port if isinstance(settings, WorkerSettings) else settings.port)
    if name == "kafka":  # clients may use the advertised listeners, not the controller's
        listeners = service["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
        ports |= {int(u.rsplit(":", 1)[1]) for u in listeners if f"//{name}:" in u}
    return ports


def test_compose_file_matches_the_compose_specification(compose):
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_compose_runs_kafka_in_kraft_mode_redis_postgres_gateway_workers_and_monitoring(compose):
    services = compose["services"]
    assert {"kafka", "redis", "postgres", "topics", "gateway", "workers", "prometheus",
            "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    argv, _ = _sluice_services(compose)["topics"]
    assert argv[:3] == ["sluice", "topics", "create"]


def test_every_sluice_environment_parses_with_the_processes_own_settings(compose):
    sluice = _sluice_services(compose)
    assert set(sluice) == {"topics", "gateway", "workers"}
    gateway = _settings_for(*sluice["gateway"])
    workers = _settings_for(*sluice["workers"])
    assert isinstance(gateway, Settings) and isinstance(workers, WorkerSettings)
    assert gateway.processes == 2
    assert gateway.kafka_idempotence and workers.kafka_idempotence  # real Kafka
    assert gateway.admin_keys, "keys.env must give the gateway SLUICE_ADMIN_KEYS"
    for name, (argv, env) in sluice.items():
        settings = _settings_for(argv, env)
        mounts = [v.split(":") for v in compose["services"][name]["volumes"]]
        assert [str(settings.catalogue_dir), "ro"] in [m[1:] for m in mounts], name
        for host_port in settings.kafka_bootstrap.split(","):
            host, port = host_port.rsplit(":", 1)
            assert int(port) in _container_ports(compose, host), host_port
        redis = urlparse(settings.redis_url)
        assert redis.port in _container_ports(compose, redis.hostname)
    storage = urlparse(workers.storage_url)
    assert storage.scheme == "postgresql" and storage.hostname == "postgres"
    postgres = compose["services"]["postgres"]["environment"]
    assert (storage.username, storage.password, storage.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_compose_starts_in_order_on_health_and_on_the_topics(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            condition = how["condition"]
            assert dependency in services, (name, dependency)
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") in (None, "no", "on-failure")
    for name in ("gateway", "workers"):
        assert services[name]["depends_on"]["topics"]["condition"] == \
            "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["workers"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_gateway_healthcheck_asks_readyz_on_the_gateway_port(compose):
    argv, env = _sluice_services(compose)["gateway"]
    settings = _settings_for(argv, env)
    check = " ".join(compose["services"]["gateway"]["healthcheck"]["test"])
    url = urlparse(re.search(r"http://[^'\"\s]+", check).group(0))
    assert url.path == "/readyz" and url.path in _gateway_routes()
    assert url.port == settings.port
    grace = compose["services"]["gateway"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > settings.shutdown_timeout_s


def test_compose_host_paths_exist(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
        for env_file in service.get("env_file", []):
            assert (COMPOSE_DIR / env_file).is_file(), f"{name}: {env_file}"
        if "build" in service:
            context = COMPOSE_DIR / service["build"]["context"]
            assert context.resolve() == ROOT
            assert (context / service["build"]["dockerfile"]).is_file()


def _prometheus_config() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())


def test_prometheus_scrapes_the_gateway_and_the_workers_on_their_metrics_ports(compose):
    sluice = _sluice_services(compose)
    expected = {"sluice-gateway": ("gateway", "/metrics"),
                "sluice-workers": ("workers", "/metrics")}
    jobs = {job["job_name"]: job for job in _prometheus_config()["scrape_configs"]}
    assert set(jobs) == set(expected)
    for job_name, (service, path) in expected.items():
        job = jobs[job_name]
        assert job.get("metrics_path", "/metrics") == path
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        settings = _settings_for(*sluice[service])
        port = settings.metrics_port if isinstance(settings, WorkerSettings) else settings.port
        assert targets == [f"{service}:{port}"]
    assert "/metrics" in _gateway_routes()


def _mounted_view(service: dict, tmp_path: Path, under: str) -> Path:
    """Recreate in ``tmp_path`` what a service sees below ``under`` from its bind mounts."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith(".") and target.startswith(under):
            destination = tmp_path / target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            host = COMPOSE_DIR / source
            if host.is_dir():
                shutil.copytree(host, destination)
            else:
                shutil.copy(host, destination)
    return tmp_path / under.lstrip("/")


def _require(path: Path, who: str) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} ({who}) does not exist yet")


def test_promtool_accepts_the_compose_prometheus_config_with_the_alert_rules(compose, tmp_path):
    _require(ALERTS, "the alert rules")
    promtool = shutil.which("promtool") or pytest.fail("promtool is missing (Debian: prometheus)")
    service = compose["services"]["prometheus"]
    view = _mounted_view(service, tmp_path, "/etc/prometheus")
    config_file = next(a.split("=", 1)[1] for a in service["command"]
                       if a.startswith("--config.file="))
    config = tmp_path / config_file.lstrip("/")
    rules = _prometheus_config()["rule_files"]
    assert all((view / rule).is_file() for rule in rules), "rule files are not mounted"
    result = subprocess.run([promtool, "check", "config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_grafana_gets_the_datasource_and_the_dashboard(compose, tmp_path):
    _require(GRAFANA_PROVISIONING / "datasources", "the Grafana provisioning")
    _require(DASHBOARD, "the Grafana dashboard")
    grafana = compose["services"]["grafana"]
    view = _mounted_view(grafana, tmp_path, "/")
    sources = [s for f in sorted((view / "etc/grafana/provisioning/datasources").glob("*.y*ml"))
               for s in yaml.safe_load(f.read_text()).get("datasources", [])]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert prometheus, "no Prometheus datasource is provisioned"
    for source in prometheus:
        url = urlparse(source["url"])
        assert url.hostname in compose["services"], source["url"]
        assert url.port in _container_ports(compose, url.hostname), source["url"]
    providers = [p for f in sorted((view / "etc/grafana/provisioning/dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text()).get("providers", [])]
    folders = [view / p["options"]["path"].lstrip("/") for p in providers]
    assert any((folder / DASHBOARD.name).is_file() for folder in folders), folders


def test_alert_rules_and_dashboard_name_jobs_that_are_scraped(k8s):
    _require(ALERTS, "the alert rules")
    texts = [ALERTS.read_text()] + ([DASHBOARD.read_text()] if DASHBOARD.exists() else [])
    jobs = set().union(*(_job_matchers(text) for text in texts))
    compose_jobs = {job["job_name"] for job in _prometheus_config()["scrape_configs"]}
    monitored = {s["metadata"]["name"] for s in _selected_services(k8s)}
    assert jobs <= compose_jobs, jobs - compose_jobs
    assert jobs <= monitored, jobs - monitored  # a ServiceMonitor's job label is the Service name
    assert compose_jobs == monitored


# --- Kubernetes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    """The objects `kubectl apply -k deploy/kubernetes` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    _require(ALERTS, "the alert rules, source of prometheusrule.yaml")
    result = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _by_prefix(objects: list[dict], kind: str, prefix: str) -> dict:
    """A generated object (kustomize adds a content hash to its name)."""
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, (kind, prefix)
    return found[0]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _container_env(objects: list[dict], container: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = _one(objects, "Secret", ref["name"])["stringData"][ref["key"]]
    return env


def _workloads(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(object, pod spec) of every Deployment and Job."""
    return [(o, o["spec"]["template"]["spec"]) for o in objects
            if o["kind"] in ("Deployment", "Job")]


def _settings_of(objects: list[dict], container: dict) -> Settings | WorkerSettings:
    argv = container.get("command", ["sluice"]) + container.get("args", [])
    return _settings_for(argv, _container_env(objects, container))


def _selected_services(objects: list[dict]) -> list[dict]:
    services = [o for o in objects if o["kind"] == "Service"]
    return [s for m in objects if m["kind"] == "ServiceMonitor" for s in services
            if _matches(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]


def test_kustomization_renders_every_object_in_the_sluice_namespace(k8s):
    kinds = sorted((o["kind"], o["metadata"]["name"].rsplit("-", 1)[0]
                    if o["kind"] == "ConfigMap" else o["metadata"]["name"]) for o in k8s)
    assert kinds == sorted([
        ("Namespace", "sluice"), ("ConfigMap", "sluice-catalogue"), ("ConfigMap", "sluice-env"),
        ("Secret", "sluice-secrets"), ("Deployment", "sluice-gateway"),
        ("Service", "sluice-gateway"), ("HorizontalPodAutoscaler", "sluice-gateway"),
        ("PodDisruptionBudget", "sluice-gateway"), ("Deployment", "sluice-workers"),
        ("Service", "sluice-workers"), ("PodDisruptionBudget", "sluice-workers"),
        ("Job", "sluice-topics"), ("ServiceMonitor", "sluice-gateway"),
        ("ServiceMonitor", "sluice-workers"), ("PrometheusRule", "sluice")])
    for obj in k8s:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "sluice", obj["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(k8s, version):
    core = [o for o in k8s if o["kind"] not in CRD_KINDS]
    assert len(core) == len(k8s) - 3
    for obj in core:
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_mistyped_field_fails_the_kubernetes_schema(k8s):
    """The schema check above would catch a typo (strict: no unknown fields)."""
    deployment = json.loads(json.dumps(_one(k8s, "Deployment", "sluice-gateway")))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# What the Prometheus Operator's CRDs (monitoring.coreos.com/v1) require and allow, for the
# fields these manifests use. No registry package ships the CRDs' OpenAPI schema as data (the
# npm models are compiled validators; the PyPI models bring a pytest plugin), so it is spelt
# out here from the CRDs: ServiceMonitor spec requires selector and endpoints, a rule group a
# non-empty name, a rule expr and either alert or record; durations follow the CRD's pattern.
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                      r"(([0-9]+)s)?(([0-9]+)ms)?)$")
ENDPOINT_FIELDS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                   "honorLabels", "relabelings", "metricRelabelings", "params"}
GROUP_FIELDS = {"name", "interval", "rules", "labels", "limit", "query_offset",
                "partial_response_strategy"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def _crd_problems(obj: dict) -> list[str]:
    problems = []

    def check(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    check(obj["apiVersion"] == "monitoring.coreos.com/v1", "apiVersion")
    check(set(obj) == {"apiVersion", "kind", "metadata", "spec"}, "top-level fields")
    check(bool(obj["metadata"].get("name")), "metadata.name")
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        check(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel",
                            "targetLabels", "podTargetLabels"}, f"spec fields {sorted(spec)}")
        check(bool(spec.get("selector", {}).get("matchLabels")), "spec.selector.matchLabels")
        check(isinstance(spec.get("endpoints"), list) and bool(spec["endpoints"]),
              "spec.endpoints")
        for endpoint in spec.get("endpoints", []):
            check(set(endpoint) <= ENDPOINT_FIELDS, f"endpoint fields {sorted(endpoint)}")
            check(isinstance(endpoint.get("port"), str), "endpoint.port is a port name")
            for key in ("interval", "scrapeTimeout"):
                check(DURATION.match(str(endpoint.get(key, "0"))) is not None, key)
    else:
        check(set(spec) == {"groups"} and isinstance(spec["groups"], list), "spec.groups")
        names = [group.get("name") for group in spec.get("groups", [])]
        check(len(names) == len(set(names)) and all(names), f"group names {names}")
        for group in spec.get("groups", []):
            check(set(group) <= GROUP_FIELDS, f"group fields {sorted(group)}")
            check(bool(group.get("rules")), f"group {group.get('name')}: rules")
            for rule in group.get("rules", []):
                check(set(rule) <= RULE_FIELDS, f"rule fields {sorted(rule)}")
                check(isinstance(rule.get("expr"), str | int) and rule.get("expr") != "", "expr")
                check(("alert" in rule) != ("record" in rule), "alert xor record")
                for key in ("for", "keep_firing_for"):
                    check(DURATION.match(str(rule.get(key, "0"))) is not None, key)
                for key in ("labels", "annotations"):
                    check(all(isinstance(v, str) for v in rule.get(key, {}).values()), key)
    return problems


def test_servicemonitors_and_the_prometheusrule_have_what_the_operator_crds_require(k8s):
    crds = [o for o in k8s if o["kind"] in CRD_KINDS]
    assert len(crds) == 3
    for obj in crds:
        assert _crd_problems(obj) == [], obj["metadata"]["name"]
    broken = json.loads(json.dumps(_one(k8s, "PrometheusRule", "sluice")))
    del broken["spec"]["groups"][0]["rules"][0]["expr"]
    broken["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert len(_crd_problems(broken)) == 2
    typo = json.loads(json.dumps(_one(k8s, "ServiceMonitor", "sluice-gateway")))
    typo["spec"]["endpoints"][0]["intervall"] = "15s"
    del typo["spec"]["selector"]
    assert len(_crd_problems(typo)) == 2


def test_every_container_environment_parses_with_the_processes_own_settings(k8s):
    catalogue = _by_prefix(k8s, "ConfigMap", "sluice-catalogue-")["metadata"]["name"]
    seen = set()
    for obj, pod in _workloads(k8s):
        for container in pod["containers"]:
            settings = _settings_of(k8s, container)
            seen.add(type(settings))
            assert settings.kafka_idempotence
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            mount = mounts[str(settings.catalogue_dir)]
            assert mount.get("readOnly") is True
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            assert volume["configMap"]["name"] == catalogue, obj["metadata"]["name"]
    assert seen == {Settings, WorkerSettings}
    workers = _one(k8s, "Deployment", "sluice-workers")["spec"]["template"]["spec"]
    assert _settings_of(k8s, workers["containers"][0]).storage_url.startswith("postgresql://")


def test_pods_run_as_the_image_user_on_a_read_only_root_with_writable_scratch(k8s):
    for obj, pod in _workloads(k8s):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        emptydirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            assert container["image"].split(":")[0] == "sluice"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
            writable = {m["mountPath"] for m in container["volumeMounts"]
                        if m["name"] in emptydirs}
            env = _container_env(k8s, container)
            assert "/tmp" in writable, obj["metadata"]["name"]
            if "PROMETHEUS_MULTIPROC_DIR" in env:
                assert env["PROMETHEUS_MULTIPROC_DIR"] in writable


def test_gateway_probes_hit_real_routes_and_shutdown_fits_the_grace_period(k8s):
    deployment = _one(k8s, "Deployment", "sluice-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings = _settings_of(k8s, container)
    assert isinstance(settings, Settings) and settings.processes >= 2
    assert "PROMETHEUS_MULTIPROC_DIR" in _container_env(k8s, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    routes = _gateway_routes()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes
        assert ports[get["port"]] == settings.port
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + settings.shutdown_timeout_s
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"


def test_gateway_memory_limit_covers_its_processes_body_budgets(k8s):
    # README, Operations: processes x (40 x SLUICE_MAX_INFLIGHT_BODY_BYTES + 70 MB) + 70 MB
    container = _one(k8s, "Deployment", "sluice-gateway")["spec"]["template"]["spec"][
        "containers"][0]
    settings = _settings_of(k8s, container)
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    needed = settings.processes * (40 * settings.max_inflight_body_bytes + 70e6) + 70e6
    assert int(limit[:-2]) * 2**20 >= needed


def test_services_and_servicemonitors_reach_the_metrics_ports(k8s):
    assert len(_selected_services(k8s)) == 2
    for monitor in (o for o in k8s if o["kind"] == "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in k8s if s["kind"] == "Service"
                    and _matches(selector, s["metadata"]["labels"])]
        assert len(services) == 1, monitor["metadata"]["name"]
        service = services[0]
        pods = [(o, pod) for o, pod in _workloads(k8s) if o["kind"] == "Deployment" and
                _matches(service["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])]
        assert len(pods) == 1
        container = pods[0][1]["containers"][0]
        settings = _settings_of(k8s, container)
        metrics_port = (settings.metrics_port if isinstance(settings, WorkerSettings)
                        else settings.port)
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        service_ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert container_ports[service_ports[endpoint["port"]]] == metrics_port
    assert "/metrics" in _gateway_routes()


def test_autoscaler_and_disruption_budget_cover_the_gateway(k8s):
    deployment = _one(k8s, "Deployment", "sluice-gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = _one(k8s, "HorizontalPodAutoscaler", "sluice-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "sluice-gateway"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    pdb = _one(k8s, "PodDisruptionBudget", "sluice-gateway")["spec"]
    assert _matches(pdb["selector"]["matchLabels"], labels)
    assert pdb["minAvailable"] < hpa["minReplicas"]


def test_workers_are_sized_to_the_partitions_the_topics_job_creates(k8s):
    job = _one(k8s, "Job", "sluice-topics")["spec"]["template"]["spec"]["containers"][0]
    assert job["args"][:2] == ["topics", "create"]
    partitions = int(job["args"][job["args"].index("--partitions") + 1])
    workers = _one(k8s, "Deployment", "sluice-workers")
    settings = _settings_of(k8s, workers["spec"]["template"]["spec"]["containers"][0])
    assert workers["spec"]["replicas"] * settings.processes == partitions


def test_catalogue_configmap_is_the_example_catalogue(k8s):
    data = _by_prefix(k8s, "ConfigMap", "sluice-catalogue-")["data"]
    examples = {p.name: p.read_text() for p in (ROOT / "schemas/examples").glob("*.yaml")}
    assert data == examples


def _sync_module():
    spec = importlib.util.spec_from_file_location("deploy_kubernetes_sync", K8S_DIR / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_holds_exactly_the_alert_rules(k8s):
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert _one(k8s, "PrometheusRule", "sluice")["spec"]["groups"] == groups
    assert _sync_module().stale() == [], "run: python deploy/kubernetes/sync.py"
