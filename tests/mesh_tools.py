"""The rendered mesh overlays and the strict schemas they are held to, shared by the mesh tests.

`rendered("dev")` is `kubectl kustomize mesh/overlays/dev` parsed (rendered once per session, a
fresh copy per call so a test may mutate what it gets). Schemas:

- built-in kinds: `kubernetes-validate`'s strict schemas (unknown fields rejected) for Kubernetes
  `KUBERNETES_VERSION`;
- custom resources (Istio, KEDA, Prometheus Operator): the `openAPIV3Schema` of the CRDs in
  `<repo>/../shared/schemas/*.yaml`, made strict the way kubectl's server-side field validation
  is: an object schema that lists `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields` rejects unknown keys (the API server would prune them
  silently, which is how a typo in a route ends up ignored in a live cluster).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from extproc.policy import Policy, parse_policy
from extproc_dev.kubectl import render

REPO = Path(__file__).resolve().parents[1]
MESH = REPO / "mesh"
OVERLAYS = ("dev", "prod")
MODELS_DIR = MESH / "models"
POLICY_CONFIGMAP = "extproc-policy"
POLICY_KEY = "policy.yaml"

Doc = dict[str, Any]

# The cluster version the manifests target; kubernetes-validate picks its newest schemas not newer.
KUBERNETES_VERSION = "1.37"
_OBJECT_META_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def overlay_dir(overlay: str) -> Path:
    return MESH / "overlays" / overlay


@functools.cache
def _rendered(overlay: str) -> tuple[Doc, ...]:
    return tuple(render(overlay_dir(overlay)))


def rendered(overlay: str) -> list[Doc]:
    """Every document of `kubectl kustomize mesh/overlays/<overlay>`: a private copy, free to mutate."""
    return copy.deepcopy(list(_rendered(overlay)))


def by_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc.get("kind") == kind]


def named(docs: Iterable[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in by_kind(docs, kind) if doc.get("metadata", {}).get("name") == name]
    if len(found) != 1:
        raise LookupError(f"{len(found)} {kind} named {name!r} in the rendered overlay, expected 1")
    return found[0]


def ref(doc: Doc) -> str:
    """`Kind/namespace/name`, for messages."""
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"


def policy_text(docs: Iterable[Doc]) -> str:
    """The policy file as the gateway reads it: the ConfigMap's `policy.yaml` (its only key otherwise)."""
    data = named(docs, "ConfigMap", POLICY_CONFIGMAP).get("data") or {}
    if POLICY_KEY in data:
        text = data[POLICY_KEY]
    elif len(data) == 1:
        (text,) = data.values()
    else:
        raise LookupError(f"ConfigMap {POLICY_CONFIGMAP} has keys {sorted(data)}; expected {POLICY_KEY}")
    if not isinstance(text, str):
        raise LookupError(f"ConfigMap {POLICY_CONFIGMAP}: the policy is not a string")
    return text


def policy_of(docs: Iterable[Doc]) -> Policy:
    """The policy in the rendered ConfigMap `extproc-policy`, parsed by the gateway's own loader."""
    return parse_policy(yaml.safe_load(policy_text(docs)), f"ConfigMap {POLICY_CONFIGMAP}")


def shared_schemas() -> Path | None:
    """The folder of CRD files (Istio, KEDA, Prometheus Operator), or None when it is not there."""
    path = REPO.parent / "shared" / "schemas"
    return path if path.is_dir() and any(path.glob("*.yaml")) else None


# --- strict validation ------------------------------------------------------------------------


def _schema_version() -> str:
    """kubernetes-validate's schema version for KUBERNETES_VERSION (or its newest, if older)."""
    wanted = tuple(int(part) for part in KUBERNETES_VERSION.split("."))
    versions = [v for v in kv_utils.all_versions() if tuple(int(part) for part in v.split(".")[:2]) <= wanted]
    return versions[-1]


def core_problems(doc: Doc) -> list[str]:
    """A built-in kind against kubernetes-validate's strict schema: unknown fields are problems."""
    try:
        kubernetes_validate.validate(doc, _schema_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(document)"
        return [f"{ref(doc)}: {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{ref(doc)}: {exc.message}"]
    return []


def strict_schema(node: Any) -> Any:
    """A copy of a CRD's structural schema that JSON Schema validators hold to Kubernetes' rules.

    - unknown keys: rejected where the API server would prune them (see the module docstring);
    - `nullable: true`: null is allowed (an OpenAPI 3.0 keyword JSON Schema does not know);
    - `x-kubernetes-int-or-string`: an integer or a string (JSON Schema would accept anything).
    CEL rules (`x-kubernetes-validations`) are not evaluated: no CEL interpreter here.
    Free-form fields stay free: Istio's EnvoyFilter `patch.value` is a Struct (preserve-unknown-fields),
    so nothing here looks inside it; its content is held to `mesh_assets.envoy_filters` by
    test_mesh_manifests and checked by loading it into a real Envoy in another test.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("nullable") is True and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out:
        out["type"] = ["integer", "string"]
    return out


def _crd_documents(folder: Path) -> Iterator[Doc]:
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                yield doc


@functools.cache
def crd_schemas(folder: Path) -> dict[tuple[str, str], Doc]:
    """Strict schemas by (apiVersion, kind), for every served version of every CRD in `folder`."""
    schemas: dict[tuple[str, str], Doc] = {}
    for crd in _crd_documents(folder):
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            api_version = f"{spec['group']}/{version['name']}"
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            # Istio's CRDs leave out the envelope (the API server checks it); KEDA's and the
            # Prometheus Operator's give metadata as a bare object. Either way it is checked here,
            # with the same strict ObjectMeta as the built-in kinds.
            schema.setdefault("properties", {}).update(
                {
                    "apiVersion": {"const": api_version},
                    "kind": {"const": kind},
                    "metadata": {"$ref": _OBJECT_META_REF},
                }
            )
            schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
            schema["additionalProperties"] = False
            schemas[(api_version, kind)] = schema
    return schemas


@functools.cache
def _registry() -> Registry:
    version = _schema_version()
    definitions = kv_utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    resource: Resource[Any] = Resource.from_contents(definitions)
    return resource @ Registry()


def crd_groups(folder: Path) -> frozenset[str]:
    return frozenset(api_version.split("/")[0] for api_version, _ in crd_schemas(folder))


def crd_problems(doc: Doc, folder: Path) -> list[str]:
    """A custom resource against its CRD's strict schema for the document's apiVersion."""
    key = (str(doc.get("apiVersion")), str(doc.get("kind")))
    schema = crd_schemas(folder).get(key)
    if schema is None:
        return [f"{ref(doc)}: no CRD in {folder} serves {key[1]} at apiVersion {key[0]}"]
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(part) for part in e.absolute_path]):
        where = ".".join(str(part) for part in error.absolute_path) or "(document)"
        problems.append(f"{ref(doc)}: {where}: {error.message}")
    return problems


def is_custom_resource(doc: Doc) -> bool:
    """Not a built-in kind: an API group with a domain outside Kubernetes' own (`*.k8s.io`)."""
    group = str(doc.get("apiVersion", "")).rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")
