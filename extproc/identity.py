"""Who is calling: API keys (hashed, constant-time) or trusted mesh identity -> tenant.

Keys are never stored or logged in clear: the policy and mounted Secret files
hold SHA-256 digests. A presented key is hashed, a short digest prefix picks the
candidates (a random decoy when no stored digest has that prefix), and the full digests
are compared with `hmac.compare_digest`: the same work for unknown, wrong and right keys
(`python -m extproc_dev.key_timing` measures it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from extproc import names
from extproc.errors import unauthorized
from extproc.policy import KeySpec, Policy, PolicyError, TenantPolicy

_PREFIX = 12  # hex chars of the digest used to index candidates; the full digest decides
_MAX_DECOYS = 4096  # 32-byte decoys compared with unknown keys (see Authenticator.__init__)


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    tier: str
    traffic_class: str
    allowed_models: frozenset[str] | None  # None: every model
    spec: TenantPolicy


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: Tenant
    key_name: str | None  # the key's label (per-key limits, logs); never the key
    source: str  # api_key | jwt | spiffe | header


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get(names.AUTHORIZATION)
    if value:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = headers.get(names.API_KEY)
    return key.strip() if key and key.strip() else None


def spiffe_id(xfcc: str) -> str | None:
    """The URI SAN of the nearest client in x-forwarded-client-cert (its last element)."""
    element = xfcc.rsplit(",", 1)[-1]
    for field in element.split(";"):
        key, _, value = field.partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"') or None
    return None


def load_key_file(path: str) -> list[tuple[str, KeySpec]]:
    """A mounted Secret: a YAML list of {sha256, tenant, name}."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"auth.key_files: cannot read {path}: {exc}") from None
    if not isinstance(raw, list):
        raise PolicyError(f"auth.key_files: {path} must hold a list of {{sha256, tenant, name}}")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or "tenant" not in item:
            raise PolicyError(f"auth.key_files: {path}[{i}] needs `tenant`, `sha256` and `name`")
        tenant = item.pop("tenant")
        try:
            entries.append((str(tenant), KeySpec.model_validate(item)))
        except ValueError as invalid:
            raise PolicyError(f"auth.key_files: {path}[{i}]: {invalid}") from None
    return entries


def read_key_files(policy: Policy) -> list[tuple[str, KeySpec]]:
    """Every key in the policy's mounted Secret files (the only file I/O identity needs)."""
    entries: list[tuple[str, KeySpec]] = []
    for path in policy.auth.key_files:
        entries.extend(load_key_file(path))
    return entries


class Authenticator:
    """Decides who is calling from headers alone; key files are read by the caller (`read_key_files`)."""

    @classmethod
    def load(cls, policy: Policy) -> Authenticator:
        return cls(policy, read_key_files(policy))

    def __init__(self, policy: Policy, extra_keys: list[tuple[str, KeySpec]] | None = None) -> None:
        auth = policy.auth
        self.enabled = bool(policy.tenants)
        self.tenants = {
            name: Tenant(
                name=name,
                tier=spec.tier,
                traffic_class=spec.traffic_class,
                allowed_models=None if "*" in spec.allowed_models else frozenset(spec.allowed_models),
                spec=spec,
            )
            for name, spec in policy.tenants.items()
        }
        # Digest prefix -> [(full digest, the identity it proves)]; identities are built once, here.
        self._keys: dict[str, list[tuple[bytes, Identity]]] = {}
        entries = [(tenant, key) for tenant, spec in policy.tenants.items() for key in spec.keys]
        entries.extend(extra_keys or ())
        for tenant_name, key in entries:
            if tenant_name not in self.tenants:
                raise PolicyError(f"auth: key {key.name!r} names unknown tenant {tenant_name!r}")
            bucket = self._keys.setdefault(key.sha256[:_PREFIX], [])
            bucket.append((bytes.fromhex(key.sha256), Identity(self.tenants[tenant_name], key.name, "api_key")))
        # What a key whose prefix no stored digest has is compared with, so that an unknown key costs the
        # same comparison as one whose prefix is stored: otherwise the time would tell a caller that some
        # stored digest starts with its key's prefix. Random, so no key can match them; as many as there
        # are keys (to a cap) and picked by the digest, so an unknown key's candidate is no more often in
        # the CPU's cache than a stored one (one shared decoy was measurably faster to compare).
        self._decoys: list[tuple[tuple[bytes, Identity | None], ...]] = [
            ((secrets.token_bytes(32), None),) for _ in range(min(max(len(entries), 1), _MAX_DECOYS))
        ]
        self._spiffe = {sid: self.tenants[name] for name, spec in policy.tenants.items() for sid in spec.spiffe_ids}
        self.jwt_header = auth.jwt_tenant_header
        self.trust_spiffe = auth.trust_spiffe
        self.trust_tenant_header = auth.trust_tenant_header
        # Headers that must not reach the backend, or that only we may set.
        self.strip = (names.AUTHORIZATION, names.API_KEY) if auth.strip_credentials else ()
        # Every request header `identify` may read.
        self.header_names = frozenset(
            {names.AUTHORIZATION, names.API_KEY}
            | ({self.jwt_header} if self.jwt_header else set())
            | ({names.XFCC} if self.trust_spiffe else set())
            | ({names.TENANT} if self.trust_tenant_header else set())
        )

    def identify(self, headers: dict[str, str]) -> Identity:
        key = _bearer(headers)
        if key is not None:
            return self._by_key(key)
        if self.jwt_header and (claim := headers.get(self.jwt_header)):
            return Identity(self._tenant(claim), None, "jwt")
        if self.trust_spiffe and (xfcc := headers.get(names.XFCC)):
            sid = spiffe_id(xfcc)
            if sid and sid in self._spiffe:
                return Identity(self._spiffe[sid], None, "spiffe")
        if self.trust_tenant_header and (claimed := headers.get(names.TENANT)):
            return Identity(self._tenant(claimed), None, "header")
        raise unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>` or in `x-api-key`.")

    def lookup(self, key: str) -> Identity | None:
        """The identity a key proves, or None; the same work whether it is unknown, wrong or right."""
        digest = hashlib.sha256(key.encode()).digest()
        decoy = self._decoys[int.from_bytes(digest[-4:]) % len(self._decoys)]  # always computed: same work
        candidates: Sequence[tuple[bytes, Identity | None]] = self._keys.get(digest.hex()[:_PREFIX], decoy)
        match: Identity | None = None
        for stored, identity in candidates:
            # Every candidate is compared, and the result picked without a branch on it, so timing does
            # not depend on which one matches (or whether one does).
            match = (match, identity)[hmac.compare_digest(stored, digest)]
        return match

    def _by_key(self, key: str) -> Identity:
        match = self.lookup(key)
        if match is None:
            raise unauthorized("Incorrect API key provided.")
        return match

    def _tenant(self, name: str) -> Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            raise unauthorized("The caller's tenant is not known to this gateway.")
        return tenant
