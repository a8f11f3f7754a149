"""The mesh manifests, rendered by kustomize, held to strict schemas and to the policy they deploy.

No cluster is involved: every overlay is rendered with `kubectl kustomize` (kubectl 1.37) and
checked as the API server and the gateway would see it.

- Schemas, unknown fields rejected: built-in kinds with kubernetes-validate, Istio / KEDA /
  Prometheus Operator kinds with their CRDs (`tests/mesh_tools.py`).
- Consistency: the VirtualService routes and DestinationRule subsets against the policy's
  backends, each vLLM Deployment's flags against the policy's window and served name (and the
  sizing check), Services and selectors against the pods they should reach, the gateway's
  Deployment against its shutdown and security needs, the EnvoyFilters against
  `extproc.filter_contract` for the overlay's own policy, KEDA queries against `mesh_assets`.

Each consistency check is a function returning problems, so the negative tests can show that
a broken manifest is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from extproc import filter_contract, sizing
from extproc.cli import build_parser
from extproc.compiled import Target, target_for
from extproc.policy import Policy
from extproc_dev import mesh_assets
from extproc_dev.kubectl import KUBECTL_MINOR, client_version, kubectl_path
from tests.mesh_tools import (
    MODELS_DIR,
    OVERLAYS,
    POLICY_CONFIGMAP,
    POLICY_KEY,
    REPO,
    Doc,
    by_kind,
    core_problems,
    crd_problems,
    is_custom_resource,
    named,
    policy_of,
    policy_text,
    ref,
    rendered,
    shared_schemas,
)

NS = mesh_assets.NAMESPACE
(VLLM_COMPONENT,) = mesh_assets.COMPONENT_LABEL.items()
BACKEND_LABEL = mesh_assets.BACKEND_LABEL
MODEL_CONFIG_ANNOTATION = mesh_assets.MODEL_CONFIG_ANNOTATION
# GPU feature discovery's node label, the key of `sizing.GPU_MEMORY`, and the device plugin's resource.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"
EXTPROC = Path(sys.executable).parent / "extproc"
# The runtime image's last numeric USER (docker/Dockerfile): the pod runs as the same user.
IMAGE_USER = int(re.findall(r"^USER (\d+)", (REPO / "docker/Dockerfile").read_text(), re.MULTILINE)[-1])


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def docs(overlay: str) -> list[Doc]:
    return rendered(overlay)


@pytest.fixture
def policy(docs: list[Doc]) -> Policy:
    return policy_of(docs)


def _labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc.get("metadata", {}).get("labels") or {}
    return labels


def _pod_labels(deployment: Doc) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"].get("metadata", {}).get("labels") or {}
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _namespace(doc: Doc) -> str:
    namespace: str = doc.get("metadata", {}).get("namespace", "default")
    return namespace


# --- routing: VirtualServices and DestinationRules against the policy's backends ------------


def _destinations(route: Doc) -> list[Doc]:
    out: list[Doc] = [entry.get("destination") or {} for entry in route.get("route") or []]
    return out


def route_problems(docs: list[Doc], policy: Policy) -> list[str]:
    """The routing contract: one exact-header route per backend, to that backend's host only, and back."""
    problems: list[str] = []
    header = policy.gateway.backend_header
    backend_by_value = {policy.subset(backend): backend for backend in policy.backends}
    hosts = {mesh_assets.vllm_host(backend): backend for backend in policy.backends}

    subsets: dict[str, dict[str, dict[str, str]]] = {}  # host -> subset -> labels
    for rule in by_kind(docs, "DestinationRule"):
        host = rule["spec"].get("host", "")
        # Traffic policy for a Service that is no backend (the gateway's own) is not routing.
        if not host.startswith("vllm-") and not rule["spec"].get("subsets"):
            continue
        if host in subsets:
            problems.append(f"{ref(rule)}: a second DestinationRule for {host} (Istio would pick one at random)")
        if host not in hosts:
            problems.append(
                f"{ref(rule)}: host {host!r} is no policy backend's (vllm-<backend>.{NS}.svc.cluster.local)"
            )
        subsets[host] = {s["name"]: s.get("labels") or {} for s in rule["spec"].get("subsets") or []}

    service_ports = {
        f"{svc['metadata']['name']}.{_namespace(svc)}.svc.cluster.local": {p.get("port") for p in svc["spec"]["ports"]}
        for svc in by_kind(docs, "Service")
    }
    used: set[tuple[str, str]] = set()
    routes_for: dict[str, list[str]] = {value: [] for value in backend_by_value}

    def check_target(where: str, target: Doc, backend: str | None) -> None:
        host = target.get("host", "")
        if backend is not None and host != mesh_assets.vllm_host(backend):
            problems.append(f"{where}: goes to {host!r}, not backend {backend}'s {mesh_assets.vllm_host(backend)}")
        elif host not in hosts:
            problems.append(f"{where}: goes to {host!r}, which is no policy backend's host")
        subset = target.get("subset")
        if subset is not None:
            used.add((host, subset))
            if subset not in subsets.get(host, {}):
                problems.append(f"{where}: subset {subset!r} is not in the DestinationRule of {host}")
        port = (target.get("port") or {}).get("number")
        if host not in service_ports:
            problems.append(f"{where}: no Service for {host} in this overlay")
        elif port is not None and port not in service_ports[host]:
            problems.append(f"{where}: port {port} is not a port of the Service {host}")

    virtual_services = by_kind(docs, "VirtualService")
    if not any(f"llm.{NS}.svc.cluster.local" in vs["spec"].get("hosts", ()) for vs in virtual_services):
        problems.append(f"no VirtualService serves the host llm.{NS}.svc.cluster.local that clients call")
    for vs in virtual_services:
        http = vs["spec"].get("http") or []
        for index, route in enumerate(http):
            where = f"{ref(vs)}: http[{route.get('name', index)}]"
            values: list[str] = []
            for match in route.get("match") or []:
                for name, string_match in (match.get("headers") or {}).items():
                    if name != header:
                        problems.append(f"{where}: matches header {name!r}; the policy's backend_header is {header!r}")
                    elif "exact" not in string_match:
                        problems.append(f"{where}: matches {header} by {sorted(string_match)}, not exact")
                    else:
                        values.append(string_match["exact"])
            if not route.get("match") and index != len(http) - 1:
                problems.append(f"{where}: a route without match shadows every route after it")
            backends = {backend_by_value.get(value) for value in values}
            for value in values:
                if value in routes_for:
                    routes_for[value].append(where)
                else:
                    problems.append(f"{where}: routes {header}: {value!r}, which is no policy backend's header value")
            backend = next(iter(backends)) if len(backends) == 1 else None
            if len(backends) > 1:
                problems.append(f"{where}: one route for several backends ({sorted(values)})")
            destinations = _destinations(route)
            if not destinations:
                problems.append(f"{where}: no destination")
            for number, target in enumerate(destinations):
                check_target(f"{where}.route[{number}]", target, backend)
            weights = [entry.get("weight") for entry in route.get("route") or []]
            if (len(weights) > 1 or weights[0:1] != [None]) and sum(w or 0 for w in weights) != 100:
                problems.append(f"{where}: weights {weights} do not sum to 100")
            if "mirror" in route:
                check_target(f"{where}.mirror", route["mirror"], backend)
    for value, found in routes_for.items():
        if len(found) != 1:
            backend = backend_by_value[value]
            problems.append(
                f"backend {backend}: {len(found)} routes match {header}: {value!r} (want exactly 1): {found}"
            )

    deployments = vllm_deployments(docs)
    for host, named_subsets in subsets.items():
        for subset, labels in named_subsets.items():
            if (host, subset) not in used:
                problems.append(f"DestinationRule {host}: subset {subset!r} is used by no route or mirror")
            backend = hosts.get(host)
            pods = [_pod_labels(d) for b, d in deployments if b == backend]
            if backend is not None and labels and not any(_selects(labels, pod) for pod in pods):
                problems.append(
                    f"DestinationRule {host}: subset {subset!r} ({labels}) selects no vLLM pod of {backend}"
                )
    return problems


# --- vLLM Deployments and Services against the policy ---------------------------------------


def vllm_deployments(docs: list[Doc]) -> list[tuple[str | None, Doc]]:
    """Every vLLM Deployment with its backend label (None when it has none)."""
    key, value = VLLM_COMPONENT
    out: list[tuple[str | None, Doc]] = []
    for deployment in by_kind(docs, "Deployment"):
        labels = {**_pod_labels(deployment), **_labels(deployment)}
        if labels.get(key) == value:
            out.append((labels.get(BACKEND_LABEL), deployment))
    return out


def _container(deployment: Doc, preferred: str) -> Doc:
    containers: list[Doc] = deployment["spec"]["template"]["spec"]["containers"]
    for container in containers:
        if container.get("name") == preferred:
            return container
    return containers[0]


def _argv(container: Doc) -> list[str]:
    return [str(token) for token in [*(container.get("command") or []), *(container.get("args") or [])]]


def _flag_values(argv: list[str], flag: str) -> list[str] | None:
    """The values after `flag` (vLLM's nargs='+' flags take several), or None when it is absent."""
    for index, token in enumerate(argv):
        if token == flag:
            values = []
            for following in argv[index + 1 :]:
                if following.startswith("-"):
                    break
                values.append(following)
            return values
        if token.startswith(flag + "="):
            return [token.partition("=")[2]]
    return None


def backend_targets(policy: Policy, backend: str) -> list[Target]:
    """What the gateway sends to `backend`: the same targets `sizing.backend_limits` sizes it for."""
    declared = policy.backends[backend]
    return [
        target_for(model, backend, declared, policy)
        for model in policy.models
        if model.backend == backend or declared.max_model_len is not None
    ]


def _annotation(deployment: Doc, key: str) -> str | None:
    for meta in (deployment.get("metadata", {}), deployment["spec"]["template"].get("metadata", {})):
        value = (meta.get("annotations") or {}).get(key)
        if value is not None:
            return str(value)
    return None


def vllm_problems(docs: list[Doc], policy: Policy, models_dir: Path = MODELS_DIR) -> list[str]:
    """Each vLLM Deployment serves its backend's model names at the policy's window, and fits its GPUs."""
    problems: list[str] = []
    deployments = vllm_deployments(docs)
    for backend in policy.backends:
        if not any(b == backend for b, _ in deployments):
            problems.append(f"backend {backend}: no vLLM Deployment (label {BACKEND_LABEL}: {backend})")
    for labelled, deployment in deployments:
        where = ref(deployment)
        if labelled is None or labelled not in policy.backends:
            problems.append(f"{where}: label {BACKEND_LABEL}={labelled!r} names no policy backend")
            continue
        backend = labelled
        if _pod_labels(deployment).get(BACKEND_LABEL) != backend:
            problems.append(f"{where}: the pod template lacks {BACKEND_LABEL}: {backend} (selectors need it)")
        container = _container(deployment, "vllm")
        argv = _argv(container)
        try:
            limits = sizing.backend_limits(policy, backend)
        except sizing.SizingInputError as exc:
            problems.append(f"{where}: {exc}")
            continue
        wanted_names = {target.served_name for target in backend_targets(policy, backend)}
        served = _flag_values(argv, "--served-model-name")
        if served is None or not served:
            problems.append(f"{where}: no --served-model-name; the gateway writes {sorted(wanted_names)}")
        elif not wanted_names <= set(served):
            problems.append(
                f"{where}: --served-model-name {served} does not serve {sorted(wanted_names - set(served))}"
            )
        window = _flag_values(argv, "--max-model-len")
        if window is None or window != [str(limits.window)]:
            problems.append(
                f"{where}: --max-model-len {window} is not the policy's window {limits.window} for {backend}"
            )

        model_config = _annotation(deployment, MODEL_CONFIG_ANNOTATION)
        pod = deployment["spec"]["template"]["spec"]
        product = (pod.get("nodeSelector") or {}).get(GPU_PRODUCT_LABEL)
        if model_config is None:
            problems.append(f"{where}: no annotation {MODEL_CONFIG_ANNOTATION} (a folder of mesh/models/)")
        elif not (models_dir / model_config / "config.json").is_file():
            problems.append(
                f"{where}: {MODEL_CONFIG_ANNOTATION}={model_config!r}: no {models_dir / model_config}/config.json"
            )
        if product not in sizing.GPU_MEMORY:
            problems.append(
                f"{where}: nodeSelector {GPU_PRODUCT_LABEL}={product!r} is not one of {sorted(sizing.GPU_MEMORY)}"
            )
        if model_config is not None and product in sizing.GPU_MEMORY:
            for problem in sizing.check_vllm_args(
                argv,
                models_dir / model_config,
                sizing.GPU_MEMORY[product],
                limits.window,
                limits.prompt_cap,
                limits.completion_cap,
            ):
                problems.append(f"{where}: sizing: {problem}")
        # vLLM shards the model over --tensor-parallel-size GPUs: the pod must get exactly that many.
        tensor_parallel = (_flag_values(argv, "--tensor-parallel-size") or ["1"])[0]
        gpus = (container.get("resources", {}).get("limits") or {}).get(GPU_RESOURCE)
        if str(gpus) != tensor_parallel:
            problems.append(f"{where}: limits {GPU_RESOURCE}={gpus!r} but --tensor-parallel-size is {tensor_parallel}")
    return problems


def service_problems(docs: list[Doc], policy: Policy) -> list[str]:
    """`vllm-<backend>` selects that backend's vLLM pods and no other's; ports are named for Istio."""
    problems: list[str] = []
    deployments = vllm_deployments(docs)
    for backend in policy.backends:
        try:
            service = named(docs, "Service", mesh_assets.vllm_service(backend))
        except LookupError as exc:
            problems.append(f"backend {backend}: {exc}")
            continue
        selector = service["spec"].get("selector") or {}
        for other, deployment in deployments:
            selected = _selects(selector, _pod_labels(deployment))
            if other == backend and not selected:
                problems.append(f"{ref(service)}: selector {selector} misses {ref(deployment)}")
            elif other != backend and selected:
                problems.append(f"{ref(service)}: selector {selector} also selects {ref(deployment)} ({other})")
        ports = {p.get("name"): p.get("port") for p in service["spec"]["ports"]}
        if ports.get("http") != mesh_assets.VLLM_PORT:
            problems.append(f"{ref(service)}: no port {mesh_assets.VLLM_PORT} named http (ports: {ports})")
    for service in by_kind(docs, "Service"):
        for port in service["spec"].get("ports") or []:
            if not port.get("name"):
                problems.append(
                    f"{ref(service)}: port {port.get('port')} has no name (Istio needs it for the protocol)"
                )
    try:
        llm = named(docs, "Service", "llm")
        if mesh_assets.LLM_PORT not in {p.get("port") for p in llm["spec"]["ports"]}:
            problems.append(f"{ref(llm)}: no port {mesh_assets.LLM_PORT}, which clients call")
    except LookupError as exc:
        problems.append(f"the Service clients call: {exc}")
    return problems


def selector_problems(docs: list[Doc]) -> list[str]:
    """Every selector reaches some pod template in its namespace, and every Deployment selects its own pods."""
    problems: list[str] = []
    deployments = by_kind(docs, "Deployment")
    for deployment in deployments:
        match_labels = deployment["spec"]["selector"].get("matchLabels") or {}
        if not _selects(match_labels, _pod_labels(deployment)):
            problems.append(f"{ref(deployment)}: selector {match_labels} does not match its own pod template")

    def namespaces(doc: Doc) -> set[str] | None:
        """Where a selector looks: its own namespace, or a monitor's namespaceSelector (None: any)."""
        chosen = doc["spec"].get("namespaceSelector") or {}
        if chosen.get("any"):
            return None
        return set(chosen.get("matchNames") or [_namespace(doc)])

    def reaches(doc: Doc, selector: dict[str, str]) -> None:
        where = namespaces(doc)
        if not any(
            (where is None or _namespace(d) in where) and _selects(selector, _pod_labels(d)) for d in deployments
        ):
            problems.append(f"{ref(doc)}: selector {selector} matches no pod template in {where or 'any namespace'}")

    for service in by_kind(docs, "Service"):
        if service["spec"].get("selector"):
            reaches(service, service["spec"]["selector"])
    for kind in ("PodDisruptionBudget", "PodMonitor", "ServiceMonitor"):
        for doc in by_kind(docs, kind):
            selector = doc["spec"].get("selector") or {}
            if selector.get("matchExpressions"):
                continue
            if kind == "ServiceMonitor":
                where = namespaces(doc)
                services = [
                    s
                    for s in by_kind(docs, "Service")
                    if (where is None or _namespace(s) in where)
                    and _selects(selector.get("matchLabels") or {}, _labels(s))
                ]
                if not services:
                    problems.append(f"{ref(doc)}: selector {selector} matches no Service")
                continue
            reaches(doc, selector.get("matchLabels") or {})
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for doc in by_kind(docs, kind):
            target = doc["spec"].get("scaleTargetRef") or {}
            names = {d["metadata"]["name"] for d in deployments if _namespace(d) == _namespace(doc)}
            if target.get("kind", "Deployment") != "Deployment" or target.get("name") not in names:
                problems.append(f"{ref(doc)}: scaleTargetRef {target} is no Deployment of this overlay")
    # KEDA scales through an HPA of its own; a second HPA on the same Deployment fights it.
    scaled = [(d["spec"].get("scaleTargetRef") or {}).get("name") for d in by_kind(docs, "ScaledObject")]
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"].get("name") in scaled:
            problems.append(f"{ref(hpa)}: its Deployment is also scaled by a KEDA ScaledObject")
    return problems


# --- the gateway's own Deployment ---------------------------------------------------------


def gateway_deployment(docs: list[Doc]) -> Doc:
    service = named(docs, "Service", mesh_assets.EXTPROC_SERVICE)
    selector = service["spec"].get("selector") or {}
    found = [d for d in by_kind(docs, "Deployment") if _selects(selector, _pod_labels(d))]
    if len(found) != 1:
        raise LookupError(f"{ref(service)} selects {len(found)} Deployments, expected the gateway's alone")
    return found[0]


def _prestop_seconds(container: Doc) -> float:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = " ".join(str(t) for t in (pre_stop.get("exec") or {}).get("command") or [])
    found = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command)
    return float(found.group(1)) if found else 0.0


def serve_args(container: Doc) -> argparse.Namespace:
    """The container's `extproc serve` command line as the gateway's own parser reads it, env included."""
    argv = _argv(container)
    if "serve" not in argv:
        raise ValueError(f"container {container.get('name')}: {argv} does not run `extproc serve`")
    env = {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}
    stderr = io.StringIO()
    # Defaults come from the environment when the parser is built: the container's, not ours.
    with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(stderr):
        try:
            return build_parser().parse_args(argv[argv.index("serve") :])
        except SystemExit:
            raise ValueError(
                f"container {container.get('name')}: `extproc serve` rejects {argv}: {stderr.getvalue()}"
            ) from None


def gateway_problems(docs: list[Doc]) -> list[str]:
    """Runs as non-root on a read-only root, probes gRPC, drains before the kill, reads a live ConfigMap."""
    problems: list[str] = []
    try:
        deployment = gateway_deployment(docs)
    except LookupError as exc:
        return [str(exc)]
    where = ref(deployment)
    pod = deployment["spec"]["template"]["spec"]
    containers: list[Doc] = pod["containers"]
    grpc = mesh_assets.EXTPROC_GRPC_PORT
    with_port = [c for c in containers if any(p.get("containerPort") == grpc for p in c.get("ports") or [])]
    container = with_port[0] if with_port else _container(deployment, "extproc")
    pod_context = pod.get("securityContext") or {}
    context = container.get("securityContext") or {}
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    user = context.get("runAsUser", pod_context.get("runAsUser"))
    # A numeric user lets the kubelet verify runAsNonRoot without trusting the image's USER name.
    if not isinstance(user, int) or user == 0:
        problems.append(f"{where}: runAsUser {user!r} is not a numeric non-root user")
    if "replicas" in deployment["spec"]:
        # Its HPA owns the count: an apply that sets one resets a scaled-out gateway.
        problems.append(f"{where}: sets replicas, which its HorizontalPodAutoscaler owns")
    if user != IMAGE_USER:
        problems.append(f"{where}: runAsUser {user!r} is not the image's USER {IMAGE_USER}")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{where}: capabilities do not drop ALL")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    for probe_name in ("readinessProbe", "livenessProbe"):
        probe = container.get(probe_name) or {}
        if (probe.get("grpc") or {}).get("port") != grpc:
            problems.append(f"{where}: {probe_name} is not a gRPC probe on {grpc}: {probe}")

    try:
        args = serve_args(container)
    except ValueError as exc:
        return [*problems, f"{where}: {exc}"]
    pre_stop = _prestop_seconds(container)
    grace_period = pod.get("terminationGracePeriodSeconds", 30)
    # SIGTERM arrives after preStop; the gateway then drains for --grace-seconds; the kubelet's
    # SIGKILL comes terminationGracePeriodSeconds after the start of it all.
    if not grace_period > pre_stop + args.grace_seconds:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {grace_period} is not above preStop {pre_stop:g} s "
            f"+ --grace-seconds {args.grace_seconds:g} s"
        )

    volumes = [v for v in pod.get("volumes") or [] if (v.get("configMap") or {}).get("name") == POLICY_CONFIGMAP]
    if len(volumes) != 1:
        problems.append(f"{where}: {len(volumes)} volumes of ConfigMap {POLICY_CONFIGMAP}, expected 1")
    else:
        mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") == volumes[0]["name"]]
        if len(mounts) != 1:
            problems.append(f"{where}: the policy volume is mounted {len(mounts)} times, expected once")
        elif "subPath" in mounts[0]:
            # The kubelet never updates subPath mounts: the gateway's reload would not see new policies.
            problems.append(f"{where}: the policy volume is mounted with subPath, so it never updates")
        elif Path(args.policy) != Path(mounts[0]["mountPath"]) / POLICY_KEY:
            problems.append(f"{where}: --policy {args.policy} is not {mounts[0]['mountPath']}/{POLICY_KEY}")
    # The ConfigMap keeps its name (no kustomize hash suffix): a new name would be a new volume and
    # a rollout, where the gateway is built to reload the policy in place.
    if not any(c["metadata"]["name"] == POLICY_CONFIGMAP for c in by_kind(docs, "ConfigMap")):
        problems.append(f"no ConfigMap named exactly {POLICY_CONFIGMAP} (a hash suffix?)")
    return problems


# --- EnvoyFilters and KEDA against their generators -------------------------------------------


def _differences(got: Any, want: Any, path: str = "") -> list[str]:
    if isinstance(got, dict) and isinstance(want, dict):
        out: list[str] = []
        for key in sorted(set(got) | set(want), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in got:
                out.append(f"{where}: missing")
            elif key not in want:
                out.append(f"{where}: unexpected")
            else:
                out.extend(_differences(got[key], want[key], where))
        return out
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in _differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {got!r}, want {want!r}"]


def envoyfilter_problems(docs: list[Doc], policy: Policy) -> list[str]:
    """The EnvoyFilters are exactly what `mesh_assets.envoy_filters` makes of the overlay's own policy.

    Istio's schema types `patch.value` as a free-form Struct, so the strict CRD check cannot look
    inside it; this comparison with the generator, and the test that loads the same value into a
    real Envoy, are what hold it.
    """
    problems: list[str] = []
    timeout = filter_contract.message_timeout_ms(policy)
    expected = {f["metadata"]["name"]: f for f in mesh_assets.envoy_filters(policy)}
    found = {f["metadata"]["name"]: f for f in by_kind(docs, "EnvoyFilter")}
    for name in sorted(set(expected) - set(found)):
        problems.append(f"EnvoyFilter {name}: missing")
    for name, doc in sorted(found.items()):
        if name not in expected:
            problems.append(f"{ref(doc)}: not one of mesh_assets.envoy_filters ({sorted(expected)})")
            continue
        want = expected[name]
        if _namespace(doc) != want["metadata"]["namespace"]:
            problems.append(f"{ref(doc)}: in namespace {_namespace(doc)}, not {want['metadata']['namespace']}")
        for patch in doc["spec"].get("configPatches") or []:
            value = (patch.get("patch") or {}).get("value") or {}
            if value.get("name") == filter_contract.FILTER_NAME:
                got = value.get("typed_config", {}).get("message_timeout")
                if got != f"{timeout / 1000}s":
                    problems.append(
                        f"{ref(doc)}: message_timeout {got} is not message_timeout_ms(policy) = {timeout} ms"
                    )
        problems.extend(f"{ref(doc)}: spec.{d}" for d in _differences(doc["spec"], want["spec"]))
    return problems


def scaling_problems(docs: list[Doc], scaling_query: Any) -> list[str]:
    """Each ScaledObject's Prometheus query is `mesh_assets.scaling_query` for its Deployment's backend."""
    problems: list[str] = []
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    for scaled in by_kind(docs, "ScaledObject"):
        target = deployments.get((scaled["spec"].get("scaleTargetRef") or {}).get("name"))
        if target is None:
            problems.append(f"{ref(scaled)}: its scaleTargetRef is no Deployment of this overlay")
            continue
        backend = {**_pod_labels(target), **_labels(target)}.get(BACKEND_LABEL)
        for index, trigger in enumerate(scaled["spec"].get("triggers") or []):
            if trigger.get("type") != "prometheus":
                continue
            query = (trigger.get("metadata") or {}).get("query")
            want = scaling_query(_namespace(scaled), backend)
            if query != want:
                problems.append(f"{ref(scaled)}: triggers[{index}] query {query!r}, want {want!r}")
    return problems


# --- schemas -----------------------------------------------------------------------------------


def test_kubectl_is_1_37() -> None:
    assert client_version(kubectl_path()).startswith(KUBECTL_MINOR + ".")


def test_built_in_kinds_are_strictly_valid(docs: list[Doc]) -> None:
    built_in = [doc for doc in docs if not is_custom_resource(doc)]
    assert built_in
    problems = [problem for doc in built_in for problem in core_problems(doc)]
    assert problems == []


def _schemas_or_skip() -> Path:
    folder = shared_schemas()
    if folder is None:
        pytest.skip("no CRD schemas at ../shared/schemas (Istio, KEDA, Prometheus Operator): custom kinds unchecked")
    return folder


def test_custom_resources_are_strictly_valid(docs: list[Doc]) -> None:
    folder = _schemas_or_skip()
    custom = [doc for doc in docs if is_custom_resource(doc)]
    kinds = {doc["kind"] for doc in custom}
    assert {"EnvoyFilter", "VirtualService", "DestinationRule"} <= kinds
    problems = [problem for doc in custom for problem in crd_problems(doc, folder)]
    assert problems == []


def test_an_unknown_field_in_a_deployment_is_rejected() -> None:
    deployment = gateway_deployment(rendered("dev"))
    assert core_problems(deployment) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems = core_problems(deployment)
    assert len(problems) == 1
    assert "imagePullPolicyy" in problems[0]


def test_an_unknown_field_in_a_virtualservice_route_is_rejected() -> None:
    folder = _schemas_or_skip()
    service = by_kind(rendered("dev"), "VirtualService")[0]
    assert crd_problems(service, folder) == []
    service["spec"]["http"][0]["retry"] = {"attempts": 3}  # the field is `retries`
    problems = crd_problems(service, folder)
    assert len(problems) == 1
    assert "'retry' was unexpected" in problems[0]
    assert "spec.http.0" in problems[0]


def test_an_unknown_field_in_a_scaledobject_trigger_is_rejected() -> None:
    folder = _schemas_or_skip()
    scaled = [s for overlay in OVERLAYS for s in by_kind(rendered(overlay), "ScaledObject")]
    assert scaled, "no ScaledObject in any overlay"
    assert crd_problems(scaled[0], folder) == []
    scaled[0]["spec"]["triggers"][0]["authRef"] = {"name": "x"}  # the field is `authenticationRef`
    problems = crd_problems(scaled[0], folder)
    assert len(problems) == 1
    assert "'authRef' was unexpected" in problems[0]


# --- consistency -------------------------------------------------------------------------------


def test_routes_follow_the_policy(docs: list[Doc], policy: Policy) -> None:
    assert route_problems(docs, policy) == []


def test_vllm_deployments_serve_the_policy(docs: list[Doc], policy: Policy) -> None:
    assert vllm_problems(docs, policy) == []


def test_services_reach_their_backends(docs: list[Doc], policy: Policy) -> None:
    assert service_problems(docs, policy) == []


def test_selectors_reach_pods(docs: list[Doc]) -> None:
    assert selector_problems(docs) == []


def test_gateway_deployment(docs: list[Doc]) -> None:
    assert gateway_problems(docs) == []


def test_envoyfilters_follow_the_contract_for_the_overlays_policy(docs: list[Doc], policy: Policy) -> None:
    assert envoyfilter_problems(docs, policy) == []


def test_scaledobjects_query_their_backend(docs: list[Doc]) -> None:
    scaling_query = getattr(mesh_assets, "scaling_query", None)
    if scaling_query is None:
        pytest.skip("extproc_dev.mesh_assets.scaling_query does not exist yet")
    assert scaling_problems(docs, scaling_query) == []


def _key_file_entries(policy: Policy) -> list[dict[str, str]]:
    tenant = next(iter(policy.tenants), "tenant")
    return [{"tenant": tenant, "name": "test-key", "sha256": hashlib.sha256(b"sk-test-only").hexdigest()}]


def test_the_configmaps_policy_passes_policy_check(docs: list[Doc], policy: Policy, tmp_path: Path) -> None:
    raw = yaml.safe_load(policy_text(docs))
    # Key files are a mounted Secret in the cluster; a stand-in with one valid key takes their place.
    key_files = raw.get("auth", {}).get("key_files") or []
    for index, _ in enumerate(key_files):
        stand_in = tmp_path / f"keys-{index}.yaml"
        stand_in.write_text(yaml.safe_dump(_key_file_entries(policy)))
        key_files[index] = str(stand_in)
    path = tmp_path / POLICY_KEY
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run([str(EXTPROC), "policy", "check", str(path)], capture_output=True, text=True, check=False)
    # Warnings (a fallback with a shorter window, say) are the policy author's call, not errors.
    assert done.returncode == 0, done.stderr


def test_derived_mesh_files_are_up_to_date() -> None:
    done = subprocess.run(
        [str(EXTPROC), "mesh-assets", "--check"], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert done.returncode == 0, done.stderr


# --- negative tests: the checks catch what they are for -----------------------------------------


@pytest.fixture
def dev() -> tuple[list[Doc], Policy]:
    docs = rendered("dev")
    return docs, policy_of(docs)


def test_a_missing_backend_route_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    backend = "large-reasoning-model"
    value = policy.subset(backend)
    for service in by_kind(docs, "VirtualService"):
        service["spec"]["http"] = [
            route
            for route in service["spec"]["http"]
            if not any(
                (m.get("headers") or {}).get(policy.gateway.backend_header, {}).get("exact") == value
                for m in route.get("match") or []
            )
        ]
    problems = route_problems(docs, policy)
    assert any(f"backend {backend}: 0 routes" in p for p in problems), problems


def test_a_route_on_another_header_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    other = policy.model_copy(update={"gateway": policy.gateway.model_copy(update={"backend_header": "x-pool"})})
    problems = route_problems(docs, other)
    assert any("the policy's backend_header is 'x-pool'" in p for p in problems), problems


def _set_flag(container: Doc, flag: str, value: str) -> None:
    for key in ("command", "args"):
        tokens = [str(t) for t in container.get(key) or []]
        for index, token in enumerate(tokens):
            if token == flag:
                tokens[index + 1] = value
            elif token.startswith(flag + "="):
                tokens[index] = f"{flag}={value}"
        container[key] = tokens
    assert _flag_values(_argv(container), flag) == [value]


def test_a_changed_max_model_len_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    deployment = next(d for b, d in vllm_deployments(docs) if b == "default-8b")
    _set_flag(_container(deployment, "vllm"), "--max-model-len", "4096")
    problems = vllm_problems(docs, policy)
    assert any("--max-model-len ['4096'] is not the policy's window" in p for p in problems), problems


def test_an_unused_subset_for_an_unknown_backend_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    rule = named(docs, "DestinationRule", mesh_assets.vllm_service("default-8b"))
    ghost = {**rule, "metadata": {**rule["metadata"], "name": "vllm-ghost"}}
    ghost["spec"] = {
        "host": mesh_assets.vllm_host("ghost"),
        "subsets": [{"name": "ghost", "labels": {"version": "v9"}}],
    }
    docs.append(ghost)
    rule["spec"]["subsets"].append({"name": "ghost", "labels": {"version": "v9"}})
    problems = route_problems(docs, policy)
    assert any(f"host {mesh_assets.vllm_host('ghost')!r} is no policy backend's" in p for p in problems), problems
    assert any(f"{rule['spec']['host']}: subset 'ghost' is used by no route" in p for p in problems), problems
    assert any("subset 'ghost' ({'version': 'v9'}) selects no vLLM pod" in p for p in problems), problems


def test_a_message_timeout_off_the_policy_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    slower = policy.model_copy(update={"queue": policy.queue.model_copy(update={"max_wait_ms": 9000})})
    problems = envoyfilter_problems(docs, slower)
    assert any("is not message_timeout_ms(policy) = 10000 ms" in p for p in problems), problems


def test_a_subpath_policy_mount_and_a_short_grace_period_are_problems(dev: tuple[list[Doc], Policy]) -> None:
    docs, _ = dev
    deployment = gateway_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if (v.get("configMap") or {}).get("name") == POLICY_CONFIGMAP)
    for container in pod["containers"]:
        for mount in container.get("volumeMounts") or []:
            if mount["name"] == volume["name"]:
                mount["subPath"] = POLICY_KEY
    pod["terminationGracePeriodSeconds"] = 1
    problems = gateway_problems(docs)
    assert any("mounted with subPath" in p for p in problems), problems
    assert any("terminationGracePeriodSeconds 1 is not above" in p for p in problems), problems


def test_an_unnamed_service_port_is_a_problem(dev: tuple[list[Doc], Policy]) -> None:
    docs, policy = dev
    service = named(docs, "Service", mesh_assets.vllm_service(next(iter(policy.backends))))
    del service["spec"]["ports"][0]["name"]
    problems = service_problems(docs, policy)
    assert any("has no name" in p for p in problems), problems
