"""deploy/k8s and deploy/Containerfile, offline (no cluster runs on these machines): every overlay renders with
`kubectl kustomize`, each object validates against the Kubernetes 1.32 schemas (strict: an unknown field is an
error) or KEDA's ScaledObject schema, and the checks a schema cannot make: selectors match their pods' labels, a
Service's ports exist in its pods, every container's variables and arguments parse with the real command's parser
(the advertised address from status.podIP, the probes on the ports the processes serve), the grace period
outlasts preStop and the drain, one budget and one autoscaler per pool on series the router exports. And the cpu
overlay's pods' commands and variables, run here as local processes, serve."""
from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

import router.__main__ as router_main
from common.cluster.flags import worker_parser
from common.cluster.runtime import DRAIN_SETTLE_S, HEARTBEAT_INTERVAL_S
from common.env_flags import apply_environment
from router.metrics import ClusterCollector
from router.server import FINAL_SHUTDOWN_S
from tests.support.cluster_harness import free_port
from tests.workers.test_cluster import stream_chat

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "hpa", "keda")
AUTOSCALED = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}
KUBERNETES_VERSION = "1.32"  # the kubectl on these machines
ROLES = ("prefill", "decode")
ROLE_LABEL = "app.kubernetes.io/component"
POD_IP = "10.1.2.3"  # what the Downward API would give
KUBECTL = shutil.which("kubectl")
START_WAIT_S = 180.0  # three processes loading the tiny model on a shared 2-core box, with margin
EXIT_WAIT_S = 60.0  # a drained idle worker leaves after its 1 s settle

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed here, so the Kustomize "
                                                           "overlays cannot be rendered (kubectl kustomize)")


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def objects(request) -> list[dict]:
    return copy.deepcopy(list(render(request.param)))  # a test may not change what the next one reads


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def role_of(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"][ROLE_LABEL]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def the_pods(objects: list[dict], selector: dict) -> list[dict]:
    """The Deployments whose pods `selector` (a Service's, or a matchLabels) picks."""
    return [d for d in of_kind(objects, "Deployment") if selects(selector, d["spec"]["template"]["metadata"]["labels"])]


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """The variables a container starts with: its ConfigMaps', then its own env (which wins, as in Kubernetes);
    a Downward API field as the value it would have."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    downward = {"status.podIP": POD_IP, "metadata.name": "nano-pd-pod-0"}
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else downward[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def parsed_command(objects: list[dict], deployment: dict):
    """The container's command line as its own program parses it, variables included."""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    python, dash_m, module = container["command"]
    assert (python, dash_m) == ("python", "-m")
    env = container_env(objects, container)
    if module == "router":
        parser = apply_environment(router_main.parser(), env)
    else:
        parser = worker_parser(module.removesuffix("_worker"), environ=env)
    return parser.parse_args(container.get("args", []))


def prestop_seconds(pod: dict) -> float:
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def port_number(container: dict, port) -> int:
    """A probe's or a Service's target port, by name or number, as the container declares it."""
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in numbers or port in numbers.values(), f"{port} is not a port of {container['name']}"
    return numbers.get(port, port)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_the_cluster(overlay):
    found = sorted((o["kind"], re.sub(r"^nano-pd-settings-[a-z0-9]+$", "nano-pd-settings", o["metadata"]["name"]))
                   for o in render(overlay))
    expected = [("ConfigMap", "nano-pd-settings"), ("Service", "nano-pd-router"),
                ("Service", "nano-pd-router-control"), ("PodDisruptionBudget", "nano-pd-prefill"),
                ("PodDisruptionBudget", "nano-pd-decode")] + [("Deployment", f"nano-pd-{c}") for c in
                                                            ("router", *ROLES)]
    expected += [(AUTOSCALED[overlay], f"nano-pd-{role}") for role in ROLES] if overlay in AUTOSCALED else []
    assert found == sorted(expected)


@needs_kubectl
def test_the_objects_validate_against_the_kubernetes_schemas(objects):
    for o in objects:
        if o["kind"] != "ScaledObject":  # a KEDA type, below
            kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)


def test_the_strict_schemas_refuse_an_unknown_field():
    deployment = yaml.safe_load((K8S / "base" / "prefill.yaml").read_text())
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    scaled = next(yaml.safe_load_all((K8S / "overlays" / "keda" / "scaledobjects.yaml").read_text()))
    keda_validator().validate(scaled)
    scaled["spec"]["minReplicas"] = 1  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        keda_validator().validate(scaled)


@functools.cache
def keda_validator() -> jsonschema.Draft202012Validator:
    """KEDA's ScaledObject schema (cloudcoil's models, generated from KEDA 2.16's CRD), made strict as
    kubernetes-validate's are: no field the CRD does not name."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)

    schema = ScaledObject.model_json_schema(by_alias=True)
    strict(schema)
    return jsonschema.Draft202012Validator(schema)


@needs_kubectl
def test_the_scaled_objects_validate_against_kedas_schema():
    for o in of_kind(list(render("keda")), "ScaledObject"):
        keda_validator().validate(o)


@needs_kubectl
def test_selectors_match_the_pod_labels(objects):
    for d in of_kind(objects, "Deployment"):
        assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
        assert d["metadata"]["labels"] == d["spec"]["template"]["metadata"]["labels"]
    for service in of_kind(objects, "Service"):
        assert [role_of(d) for d in the_pods(objects, service["spec"]["selector"])] == ["router"]
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert sorted(role_of(d) for b in budgets for d in the_pods(objects, b["spec"]["selector"]["matchLabels"])) == \
           sorted(ROLES)  # one budget per pool, none for the single router (it would block node drains)


@needs_kubectl
def test_every_port_a_service_names_exists_in_its_pods(objects):
    for service in of_kind(objects, "Service"):
        for pod in the_pods(objects, service["spec"]["selector"]):
            [container] = pod["spec"]["template"]["spec"]["containers"]
            for port in service["spec"]["ports"]:
                port_number(container, port["targetPort"])


@needs_kubectl
def test_the_router_serves_the_ports_its_services_name(objects):
    router = named(objects, "Deployment", "nano-pd-router")
    [container] = router["spec"]["template"]["spec"]["containers"]
    args = parsed_command(objects, router)
    assert (args.host, args.control_host) == ("0.0.0.0", "0.0.0.0")
    assert args.port == port_number(container, "http") and args.control_port == port_number(container, "control")
    assert router["spec"]["replicas"] == 1 and router["spec"]["strategy"]["type"] == "Recreate"
    # workers register through the control Service before the router can be ready: it must publish it unready
    control = named(objects, "Service", "nano-pd-router-control")
    assert control["spec"]["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in control["spec"]["ports"]] == ["control"]
    assert not named(objects, "Service", "nano-pd-router")["spec"].get("publishNotReadyAddresses")
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: (p["path"], p["port"]) for kind, p in probes.items()} == {
        "startupProbe": ("/cluster", "http"), "livenessProbe": ("/cluster", "http"),
        "readinessProbe": ("/ready", "http")}


@needs_kubectl
def test_workers_advertise_their_pod_ip_and_find_the_router(objects):
    control = named(objects, "Service", "nano-pd-router-control")
    router_address = f"{control['metadata']['name']}:{control['spec']['ports'][0]['port']}"
    for role in ROLES:
        deployment = named(objects, "Deployment", f"nano-pd-{role}")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        [advertised] = [v for v in container["env"] if v["name"] == "NANO_PD_ADVERTISE_HOST"]
        assert advertised["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        args = parsed_command(objects, deployment)
        assert (args.advertise_host, args.host, args.router) == (POD_IP, "0.0.0.0", router_address)
        assert getattr(args, "role", "prefill") == role
        # the probes reach the worker's own --health-port
        assert args.health_port == port_number(container, "health")
        for kind, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
            probe = container[kind]["httpGet"]
            assert probe["path"] == path and port_number(container, probe["port"]) == args.health_port


@needs_kubectl
def test_the_grace_period_outlasts_prestop_and_the_drain(objects):
    for d in of_kind(objects, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        args = parsed_command(objects, d)
        # the router's uvicorn gets FINAL_SHUTDOWN_S to close connections; a drained worker waits DRAIN_SETTLE_S
        after_drain = FINAL_SHUTDOWN_S if role_of(d) == "router" else DRAIN_SETTLE_S
        assert prestop_seconds(pod) >= 2 * HEARTBEAT_INTERVAL_S
        assert pod["terminationGracePeriodSeconds"] > prestop_seconds(pod) + args.drain_timeout + after_drain
        # a Service named nano-pd-* would otherwise inject NANO_PD_*_PORT=tcp://... variables, which are flags here
        assert pod["enableServiceLinks"] is False


@needs_kubectl
def test_every_container_requests_resources(objects):
    for d in of_kind(objects, "Deployment"):
        for container in d["spec"]["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), d["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("overlay, transport, device, gpus", [("cpu", "zmq", "cpu", None), ("gpu", "nixl", "cuda", 1)])
def test_the_cpu_and_gpu_overlays(overlay, transport, device, gpus):
    objects = list(render(overlay))
    for role in ROLES:
        deployment = named(objects, "Deployment", f"nano-pd-{role}")
        args = parsed_command(objects, deployment)
        assert (args.kv_transport, args.device) == (transport, device)
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == gpus
    router = named(objects, "Deployment", "nano-pd-router")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in router["resources"].get("limits", {})  # the router runs no model


def router_series() -> set[str]:
    return {family.name for family in ClusterCollector("m").describe()}


@needs_kubectl
def test_one_hpa_per_pool_on_the_routers_series():
    objects = list(render("hpa"))
    autoscalers = of_kind(objects, "HorizontalPodAutoscaler")
    assert sorted(a["spec"]["scaleTargetRef"]["name"] for a in autoscalers) == sorted(f"nano-pd-{r}" for r in ROLES)
    rule = yaml.safe_load((K8S / "overlays" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    [external] = rule["rules"]["external"]
    exposed = re.search(r'__name__=~"([^"]+)"', external["seriesQuery"]).group(1)
    assert external["name"] == {"matches": "^(.*)$", "as": "${1}"}  # the series keep their names
    for hpa in autoscalers:
        target = named(objects, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"]  # the autoscaler's; an apply must not reset it
        for metric in hpa["spec"]["metrics"]:
            name = metric["external"]["metric"]["name"]
            assert name in router_series() and re.match(exposed, name), name
            assert metric["external"]["metric"]["selector"] == {"matchLabels": {"role": role_of(target)}}
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


@needs_kubectl
def test_one_scaled_object_per_pool_on_the_routers_series():
    objects = list(render("keda"))
    scaled = of_kind(objects, "ScaledObject")
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(f"nano-pd-{r}" for r in ROLES)
    for s in scaled:
        target = named(objects, "Deployment", s["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"]
        for trigger in s["spec"]["triggers"]:
            assert trigger["type"] == "prometheus" and trigger["metricType"] in ("Value", "AverageValue")
            name, role = re.fullmatch(r'max\(([\w:]+)\{role="(\w+)"\}\)', trigger["metadata"]["query"]).groups()
            assert name in router_series() and role == role_of(target)
            float(trigger["metadata"]["threshold"])
        behavior = s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60


def makefile_pins() -> tuple[str, str]:
    """The torch line and the --no-deps line of `make setup`, as pip arguments."""
    setup = (REPO / "Makefile").read_text()
    torch = re.search(r"pip install -q (torch==\S+)", setup).group(1)
    no_deps = re.search(r"pip install -q (--no-deps .+)", setup).group(1).strip()
    return torch, no_deps


def test_the_containerfile_installs_what_make_setup_does():
    parsed = DockerfileParser(fileobj=(REPO / "deploy" / "Containerfile").open("rb"))
    assert parsed.baseimage == "python:3.11-slim"
    runs = [i["value"] for i in parsed.structure if i["instruction"] == "RUN"]
    torch, no_deps = makefile_pins()
    assert any(re.fullmatch(rf'pip install --index-url "\$TORCH_INDEX_URL" {re.escape(torch)}', r) for r in runs)
    assert any(f"pip install . && pip install {no_deps}" == r for r in runs), runs
    assert torch in (REPO / "pyproject.toml").read_text()  # the project's own pin, met by that wheel
    # it copies every package pyproject.toml installs, and only what exists
    copied = [i["value"].split() for i in parsed.structure if i["instruction"] == "COPY"]
    assert all((REPO / source).exists() for source, _ in copied)
    packages = re.search(r"include = \[([^]]+)\]", (REPO / "pyproject.toml").read_text()).group(1)
    assert {p.strip(' "*') for p in packages.split(",")} == {s for s, _ in copied} - {"pyproject.toml"}


@needs_kubectl
def test_the_pods_run_as_the_images_user_on_the_ports_it_exposes(objects):
    parsed = DockerfileParser(fileobj=(REPO / "deploy" / "Containerfile").open("rb"))
    [user] = [i["value"] for i in parsed.structure if i["instruction"] == "USER"]
    [exposed] = [i["value"].split() for i in parsed.structure if i["instruction"] == "EXPOSE"]
    for d in of_kind(objects, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": int(user)}
        assert {str(p["containerPort"]) for c in pod["containers"] for p in c["ports"]} <= set(exposed)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return None


@needs_kubectl
def test_the_cpu_overlays_pods_serve_when_run_here(model_dir, offline, tmp_path):
    """The router and one worker of each pool started as the cpu overlay's pods start them: the rendered command,
    no flag, every setting from the pod's variables; only what belongs to this machine is replaced (addresses,
    ports, the model, threads, the KV pool), and every prompt goes through the prefill worker. The workers turn
    ready on their health ports, then the router; a greedy stream equals the offline engine; SIGTERM (what a
    deleted pod gets after its preStop) drains a worker, which exits 0."""
    objects = list(render("cpu"))
    http, control = free_port(), free_port()
    here = {"NANO_PD_MODEL": model_dir, "NANO_PD_SERVED_MODEL_NAME": "tiny", "NANO_PD_HOST": "127.0.0.1",
            "NANO_PD_CONTROL_HOST": "127.0.0.1", "NANO_PD_ADVERTISE_HOST": "127.0.0.1", "NANO_PD_PORT": str(http),
            "NANO_PD_CONTROL_PORT": str(control), "NANO_PD_ROUTER": f"127.0.0.1:{control}", "NANO_PD_THREADS": "1",
            "NANO_PD_NUM_KV_BLOCKS": "512", "NANO_PD_LOCAL_PREFILL_MAX_TOKENS": "0"}
    base = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    procs, ready_urls = {}, {"router": f"http://127.0.0.1:{http}/ready"}

    def logs() -> str:
        return "\n".join(f"--- {name}\n" + (tmp_path / f"{name}.log").read_text()[-2000:] for name in procs)

    try:
        for component in ("router", *ROLES):
            [container] = named(objects, "Deployment", f"nano-pd-{component}")["spec"]["template"]["spec"][
                "containers"]
            env = {**base, **container_env(objects, container), **here}
            if component != "router":
                env["NANO_PD_HEALTH_PORT"] = str(free_port())
                ready_urls[component] = f"http://127.0.0.1:{env['NANO_PD_HEALTH_PORT']}/ready"
            command = [sys.executable, *container["command"][1:]]  # "python": this one, here
            with (tmp_path / f"{component}.log").open("wb") as log:
                procs[component] = subprocess.Popen([*command, *container.get("args", [])],
                                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
        deadline = time.monotonic() + START_WAIT_S
        while any(http_status(url) != 200 for url in ready_urls.values()):
            assert time.monotonic() < deadline, f"not ready in {START_WAIT_S} s\n{logs()}"
            assert all(p.poll() is None for p in procs.values()), f"a process exited\n{logs()}"
            time.sleep(0.2)

        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = "the pods read their settings from the environment"
        assert stream_chat(client, prompt, 16)["text"] == offline([prompt], 16)[0]
        procs["decode"].send_signal(signal.SIGTERM)
        assert procs["decode"].wait(EXIT_WAIT_S) == 0, logs()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(EXIT_WAIT_S)
