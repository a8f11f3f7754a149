"""The files under mesh/ and docker/ that are derived from another source, and their generator.

kustomize reads only files inside a kustomization's own directory, so what the manifests share
with the rest of the repository is written there as a copy and checked: `extproc mesh-assets`
writes them, `extproc mesh-assets --check` (and a test) fails when one is stale.

- the policy ConfigMap's file: a copy of the example policy (`extproc/examples/policy.yaml`);
- the EnvoyFilters: rendered from `extproc.filter_contract`, the one source of the filter's shape;
- the dashboard ConfigMap's file and the PrometheusRule: from `observability/`;
- the KEDA ScaledObjects: one per vLLM Deployment under `mesh/base/vllm/`, each with `scaling_query`;
- the dev overlay's `--load-url` arguments: one per backend of the example policy;
- the prod overlay's policy (the example without inline keys, load from headless Services) and
  those headless Services;
- the compose stack's Envoy bootstrap (`docker/envoy.yaml`): the local stack's renderer.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from extproc import filter_contract
from extproc.policy import Policy, example_policy_path, load_policy
from extproc_dev import compose

# The repository: this module runs from a development install (an editable one), never from the image.
ROOT: Final = Path(__file__).resolve().parents[2]
MESH: Final = ROOT / "mesh"

# Where the gateway runs in the mesh; the manifests and the EnvoyFilter agree on these.
NAMESPACE: Final = "llm-serving"
EXTPROC_SERVICE: Final = "extproc"
EXTPROC_GRPC_PORT: Final = 50051
# Istio's own cluster for the gateway's Service: traffic to it is ISTIO_MUTUAL mTLS, and HTTP/2
# because the Service port is named `grpc` with `appProtocol: grpc`.
EXTPROC_CLUSTER: Final = f"outbound|{EXTPROC_GRPC_PORT}||{EXTPROC_SERVICE}.{NAMESPACE}.svc.cluster.local"
# The Service clients call for the LLM API, and its port. The sidecar filter is installed on that
# port's outbound listener, which every service on the port shares: it is enabled for this host only.
LLM_SERVICE: Final = "llm"
LLM_HOST: Final = f"{LLM_SERVICE}.{NAMESPACE}.svc.cluster.local"
LLM_PORT: Final = 8000
# The ingress gateway: its pods' label, the container port its Gateway server listens on, and the
# Gateway server's port and host (Istio names the virtual host `HOST:PORT`).
INGRESS_NAMESPACE: Final = "istio-system"
INGRESS_SELECTOR: Final = {"istio": "ingressgateway"}
INGRESS_PORT: Final = 8080
PUBLIC_HOST: Final = "llm.example.com"
PUBLIC_PORT: Final = 80
# Client workloads opt in with this pod label (the SIDECAR_OUTBOUND filter's workloadSelector).
CLIENT_LABEL: Final = {"llm.extproc.io/client": "true"}
# The gateway's Prometheus /metrics port (Service port `http-metrics`).
EXTPROC_METRICS_PORT: Final = 9400
# Every backend B is the Service `vllm-B` on this port (named `http`); its pods carry these labels.
VLLM_PORT: Final = 8000
BACKEND_LABEL: Final = "llm.extproc.io/backend"
COMPONENT_LABEL: Final = {"app.kubernetes.io/component": "vllm"}
# The directory under mesh/models/ holding the config.json of a Deployment's checkpoint.
MODEL_CONFIG_ANNOTATION: Final = "llm.extproc.io/model-config"
# The Prometheus the Prometheus Operator runs (its `prometheus-operated` Service): KEDA queries it.
PROMETHEUS_URL: Final = "http://prometheus-operated.monitoring.svc.cluster.local:9090"


def vllm_service(backend: str) -> str:
    return f"vllm-{backend}"


def vllm_host(backend: str) -> str:
    return f"{vllm_service(backend)}.{NAMESPACE}.svc.cluster.local"


def authority_regex(host: str, *, short_names: bool, port: int | None = None) -> str:
    """An RE2 regex of the `:authority` values a request for `host` may carry, with any port or `port`.

    `short_names`: in the mesh a client may call a Service by any prefix of its FQDN (`llm`,
    `llm.NS`, `llm.NS.svc`, ...); at the ingress only the full public name routes.
    """
    port_part = f"(:{port})?" if port is not None else "(:[0-9]+)?"
    if not short_names:
        return f"^{re.escape(host)}{port_part}$"
    first, *rest = host.split(".")
    suffix = ""
    for label in reversed(rest):
        suffix = f"(\\.{re.escape(label)}{suffix})?"
    return f"^{re.escape(first)}{suffix}{port_part}$"


@dataclass(frozen=True, slots=True)
class FilterSite:
    """Where an EnvoyFilter puts the gateway: an Istio patch context, its listener, the LLM's virtual host."""

    context: str
    listener_port: int
    virtual_host: str  # Istio's name for it: HOST:PORT
    authorities: str


SITES: Final = {
    "GATEWAY": FilterSite(
        "GATEWAY", INGRESS_PORT, f"{PUBLIC_HOST}:{PUBLIC_PORT}", authority_regex(PUBLIC_HOST, short_names=False)
    ),
    "SIDECAR_OUTBOUND": FilterSite(
        "SIDECAR_OUTBOUND",
        LLM_PORT,
        f"{LLM_HOST}:{LLM_PORT}",
        authority_regex(LLM_HOST, short_names=True, port=LLM_PORT),
    ),
}


def _patches(site: FilterSite, policy: Policy) -> list[dict[str, Any]]:
    context, port = site.context, site.listener_port
    listener = {"portNumber": port, "filterChain": {"filter": {"name": filter_contract.HCM_FILTER}}}
    router = {
        "portNumber": port,
        "filterChain": {
            "filter": {"name": filter_contract.HCM_FILTER, "subFilter": {"name": filter_contract.ROUTER_FILTER}}
        },
    }
    timeout_ms = filter_contract.message_timeout_ms(policy)
    return [
        {
            # Off for the listener as a whole: the next patch turns it on for the LLM's virtual host.
            "applyTo": "HTTP_FILTER",
            "match": {"context": context, "listener": router},
            "patch": {
                "operation": "INSERT_BEFORE",
                "value": filter_contract.ext_proc_filter(EXTPROC_CLUSTER, timeout_ms, scoped=True),
            },
        },
        {
            "applyTo": "VIRTUAL_HOST",
            "match": {"context": context, "routeConfiguration": {"vhost": {"name": site.virtual_host}}},
            "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": filter_contract.ENABLED_HERE}},
        },
        {
            # Envoy's own errors (the gateway unreachable, a backend down) in the OpenAI error shape,
            # for requests to the LLM host only; and the report of streams cut short.
            "applyTo": "NETWORK_FILTER",
            "match": {"context": context, "listener": listener},
            "patch": {
                "operation": "MERGE",
                "value": {
                    "name": filter_contract.HCM_FILTER,
                    "typed_config": {
                        "@type": filter_contract.HCM_TYPE,
                        "local_reply_config": filter_contract.local_reply_config(
                            policy.gateway.max_body_bytes, authorities=site.authorities
                        ),
                        # Appended to the listener's access logs (a MERGE concatenates lists).
                        "access_log": [filter_contract.stream_end_log(EXTPROC_CLUSTER, policy.gateway.backend_header)],
                    },
                },
            },
        },
        {
            # BUFFERED request bodies must fit the listener's buffer (Istio's edge profile uses 32 KiB).
            "applyTo": "LISTENER",
            "match": {"context": context, "listener": {"portNumber": port}},
            "patch": {
                "operation": "MERGE",
                "value": {
                    "per_connection_buffer_limit_bytes": filter_contract.listener_buffer_limit(
                        policy.gateway.max_body_bytes
                    )
                },
            },
        },
    ]


def envoy_filters(policy: Policy) -> list[dict[str, Any]]:
    """The EnvoyFilters that put the gateway in front of the router: at the ingress and in clients."""

    def envoy_filter(name: str, selector: dict[str, str], site: FilterSite) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": {
                "name": name,
                "namespace": INGRESS_NAMESPACE,
                "labels": {"app.kubernetes.io/part-of": "extproc"},
            },
            "spec": {
                "workloadSelector": {"labels": selector},
                "configPatches": _patches(site, policy),
            },
        }

    return [
        envoy_filter("extproc-ingress", INGRESS_SELECTOR, SITES["GATEWAY"]),
        # In the root namespace, so it applies to labelled clients in every namespace.
        envoy_filter("extproc-clients", CLIENT_LABEL, SITES["SIDECAR_OUTBOUND"]),
    ]


_HEADER = "# Generated by `extproc mesh-assets` from {source}: edit that, then run it again.\n"


def _envoy_filter_file() -> str:
    policy = load_policy(example_policy_path())
    return _HEADER.format(source="extproc/filter_contract.py and the example policy") + yaml.safe_dump_all(
        envoy_filters(policy), sort_keys=False
    )


def _copy(source: Path) -> Callable[[], str]:
    return lambda: source.read_text()


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, alert descriptions) as `|` blocks, so the output reads like its source."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _dump_all(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_BlockDumper, sort_keys=False, width=120)


ALERTS_SOURCE: Final = ROOT / "observability" / "prometheus" / "alerts.yaml"
DASHBOARD_SOURCE: Final = ROOT / "observability" / "grafana" / "extproc.json"


def prometheus_rule() -> dict[str, Any]:
    """The alert rules as a PrometheusRule: the rule file's `groups`, unchanged, under `spec`."""
    groups = yaml.safe_load(ALERTS_SOURCE.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "extproc",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "extproc"},
        },
        "spec": {"groups": groups},
    }


def _prometheus_rule_file() -> str:
    return _HEADER.format(source="observability/prometheus/alerts.yaml") + _dump_all([prometheus_rule()])


# --- KEDA: one ScaledObject per vLLM Deployment ----------------------------------------------


def scaling_query(namespace: str, backend: str) -> str:
    """Queue pressure on a backend, as observability/keda.md defines it: vLLM's waiting requests plus
    the gateway's admission queue for the backend, each half `or vector(0)` so neither empties the sum.

    Every Deployment of a backend scales on it, the canary and the mirror candidate included: they
    see the whole backend's queue, not their own share, so they are capped at CANDIDATE_MAX_REPLICAS
    (keda.md's exact split, a vLLM half restricted to one version's pods, is left out on purpose: one
    query per backend, and the over-count costs at most that cap while a queue lasts).
    """
    vllm = f'(sum(vllm:num_requests_waiting{{namespace="{namespace}", backend="{backend}"}}) or vector(0))'
    gateway = f'(sum(extproc_admission_queue_length{{backend="{backend}"}}) or vector(0))'
    return f"{vllm}\n+\n{gateway}"


@dataclass(frozen=True, slots=True)
class Scaling:
    """A backend's scaling: the per-replica target of the queue query, and the GPUs it may take."""

    threshold: int = 5
    max_replicas: int = 4


# 5 waiting requests per replica is keda.md's starting point; the batch pool tolerates a queue
# (GPUs are dear, latency is not), and the 72B model takes 4 GPUs a replica.
SCALING: Final[dict[str, Scaling]] = {
    "default-8b": Scaling(threshold=5, max_replicas=8),
    "fast-8b": Scaling(threshold=5, max_replicas=4),
    "strict-json-model": Scaling(threshold=5, max_replicas=4),
    "large-reasoning-model": Scaling(threshold=5, max_replicas=2),
    "batch-pool": Scaling(threshold=20, max_replicas=4),
    "embeddings": Scaling(threshold=10, max_replicas=4),
}
# A canary or a mirror candidate takes a slice of its backend's traffic but sees its whole queue.
CANDIDATE_MAX_REPLICAS: Final = 2
STABLE_VERSION: Final = "v1"
VLLM_MANIFESTS: Final = MESH / "base" / "vllm"


@dataclass(frozen=True, slots=True)
class VllmDeployment:
    name: str
    backend: str
    version: str


def vllm_deployments() -> list[VllmDeployment]:
    """The vLLM Deployments in mesh/base/vllm/, in file order: the ScaledObjects follow them."""
    found = []
    for path in sorted(VLLM_MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") != "Deployment":
                continue
            labels = document["metadata"].get("labels", {})
            if not COMPONENT_LABEL.items() <= labels.items():
                continue
            found.append(VllmDeployment(document["metadata"]["name"], labels[BACKEND_LABEL], labels["version"]))
    return found


def scaled_objects() -> list[dict[str, Any]]:
    objects = []
    for deployment in vllm_deployments():
        scaling = SCALING.get(deployment.backend, Scaling())
        stable = deployment.version == STABLE_VERSION
        query = scaling_query(NAMESPACE, deployment.backend)
        objects.append(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledObject",
                "metadata": {
                    "name": deployment.name,
                    "namespace": NAMESPACE,
                    "labels": {"app.kubernetes.io/part-of": "extproc", BACKEND_LABEL: deployment.backend},
                },
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment.name},
                    # A cold start is a model load (minutes): keep one replica warm.
                    "minReplicaCount": 1,
                    "maxReplicaCount": scaling.max_replicas if stable else CANDIDATE_MAX_REPLICAS,
                    "pollingInterval": 15,
                    # Prometheus unreachable three polls in a row: keep the replicas running (a busy
                    # backend must not drop to a fixed count), but at least `replicas`.
                    "fallback": {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicasIfHigher"},
                    "advanced": {
                        "horizontalPodAutoscalerConfig": {
                            "behavior": {
                                "scaleUp": {
                                    "stabilizationWindowSeconds": 0,
                                    "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                                },
                                # Longer than a model load, so a dip does not cost a reload.
                                "scaleDown": {
                                    "stabilizationWindowSeconds": 600,
                                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                                },
                            }
                        }
                    },
                    "triggers": [
                        {
                            "type": "prometheus",
                            "metadata": {
                                "serverAddress": PROMETHEUS_URL,
                                "query": query,
                                "threshold": str(scaling.threshold),
                                "activationThreshold": "0",
                            },
                        }
                    ],
                },
            }
        )
    return objects


def _scaled_objects_file() -> str:
    source = "mesh/base/vllm/ and `scaling_query` (mesh_assets.py)"
    return _HEADER.format(source=source) + _dump_all(scaled_objects())


# --- the dev overlay: where the gateway reads each backend's load -----------------------------


def dev_load_url_patch(policy: Policy) -> list[dict[str, Any]]:
    """A JSON 6902 patch adding `--load-url B=http://vllm-B...:8000/metrics` for every backend.

    The example policy names no load sources, and dev runs one pod per Deployment, so the
    backend's Service reaches (one of) its pods; prod names headless Services in its policy instead.
    """
    ops = []
    for backend in policy.backends:
        url = f"http://{vllm_host(backend)}:{VLLM_PORT}/metrics"
        for value in ("--load-url", f"{backend}={url}"):
            ops.append({"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": value})
    return ops


def _dev_load_urls_file() -> str:
    ops = dev_load_url_patch(load_policy(example_policy_path()))
    return _HEADER.format(source="the example policy's backends") + yaml.safe_dump(ops, sort_keys=False)


# --- the prod overlay: the example policy without inline keys, load read from every pod ----------

KEY_FILE: Final = "/etc/extproc/keys/keys.yaml"  # the Secret extproc-api-keys, mounted as files


def pods_service(backend: str) -> str:
    """The headless Service whose DNS name resolves to every pod of the backend (both versions)."""
    return f"{vllm_service(backend)}-pods"


def prod_policy() -> dict[str, Any]:
    """The example policy as prod runs it: keys in the Secret, each backend's load from all its pods."""
    policy: dict[str, Any] = yaml.safe_load(example_policy_path().read_text())
    for name, backend in policy["backends"].items():
        backend["load"] = {"metrics_dns": f"{pods_service(name)}.{NAMESPACE}.svc.cluster.local:{VLLM_PORT}"}
    policy["auth"]["key_files"] = [KEY_FILE]
    for tenant in policy["tenants"].values():
        tenant["keys"] = []
    return policy


def _prod_policy_file() -> str:
    note = (
        "# The prod policy: the example's backends, models, rules and tenants, with every key in the key file\n"
        "# (the Secret extproc-api-keys) and each backend's load read from all its pods (a headless Service).\n"
        "# A policy of your own replaces this file; a test holds it to the manifests and to the EnvoyFilters.\n"
    )
    return _HEADER.format(source="the example policy") + note + yaml.safe_dump(prod_policy(), sort_keys=False)


def pods_services() -> list[dict[str, Any]]:
    services = []
    for backend in load_policy(example_policy_path()).backends:
        app = {"app": vllm_service(backend)}
        services.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": pods_service(backend),
                    "namespace": NAMESPACE,
                    "labels": {**app, BACKEND_LABEL: backend, "app.kubernetes.io/part-of": "extproc"},
                },
                # Headless: the name resolves to every ready pod, which the policy's metrics_dns scrapes.
                "spec": {
                    "clusterIP": "None",
                    "selector": app,
                    "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http", "protocol": "TCP"}],
                },
            }
        )
    return services


def _pods_services_file() -> str:
    return _HEADER.format(source="the example policy's backends") + _dump_all(pods_services())


# Every derived file, by its path from the repository root.
ASSETS: dict[str, Callable[[], str]] = {
    "mesh/base/gateway/policy.yaml": _copy(example_policy_path()),
    "mesh/base/gateway/envoyfilter.yaml": _envoy_filter_file,
    "mesh/base/monitoring/extproc-dashboard.json": _copy(DASHBOARD_SOURCE),
    "mesh/base/monitoring/prometheusrule.yaml": _prometheus_rule_file,
    "mesh/base/autoscaling/scaledobjects.yaml": _scaled_objects_file,
    "mesh/overlays/dev/extproc-load-urls.yaml": _dev_load_urls_file,
    "mesh/overlays/prod/policy.yaml": _prod_policy_file,
    "mesh/overlays/prod/vllm-pods-services.yaml": _pods_services_file,
    "docker/envoy.yaml": compose.compose_envoy_config,
}


def stale() -> list[str]:
    """The derived files that differ from what their sources give now."""
    out = []
    for relative, render in ASSETS.items():
        path = ROOT / relative
        if not path.exists() or path.read_text() != render():
            out.append(relative)
    return out


def write() -> list[str]:
    written = []
    for relative, render in ASSETS.items():
        path = ROOT / relative
        text = render()
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(relative)
    return written


def run_command(args: argparse.Namespace) -> int:
    if args.check:
        out = stale()
        for relative in out:
            print(f"{relative}: stale; run `extproc mesh-assets`", file=sys.stderr)
        return 1 if out else 0
    for relative in write():
        print(f"wrote {relative}")
    return 0
