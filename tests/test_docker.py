"""The runtime image and the compose stack, proven without a container runtime.

- the runtime wheel holds the gateway and nothing of the development tools;
- installed into a clean venv without extras, as the image installs it (requirements/runtime.txt with
  --require-hashes --no-deps, then the wheel with --no-deps; `pip check` clean), it serves, and
  `extproc health` sees it SERVING;
- the image's own installs (`pip install --target`, the same two) and entrypoint (`python3 -m extproc serve` on a
  Python without site-packages, with the image's ENV) serve, and its HEALTHCHECK passes;
- docker/Dockerfile, parsed by Docker's own parser (PyPI `dockerfile`): pinned bases, a distroless
  final stage that runs nothing at build time, a numeric non-root user, exec-form entrypoint, no extras;
- docker/compose.yaml against the Compose Specification's JSON schema, and against the policy;
- docker/envoy.yaml is the renderer's output, and Envoy 1.40 accepts it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import filter_contract
from extproc.compiled_form import COMPILED_MODULES
from extproc.policy import example_policy_path, load_policy
from extproc_dev import compose, mesh_assets
from extproc_dev.envoy_config import EXTPROC_CLUSTER, EnvoySetup, Upstream, render
from extproc_dev.stack import envoy_binary, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE_FILE = ROOT / compose.COMPOSE_FILE
ENVOY_CONFIG = ROOT / compose.ENVOY_CONFIG
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The Compose Specification's JSON schema, as docker-compose 1.29.2 (the last Python release) ships it.
# Its other requirements (PyYAML<6, docker, ...) clash with this project's, so it is not installed:
# pip downloads the wheel and the schema is read from it.
COMPOSE_SCHEMA_WHEEL = "docker-compose==1.29.2"
COMPOSE_SCHEMA_MEMBER = "compose/config/compose_spec.json"
# Where the image puts the packages (the builder's `pip install --target`), remapped below to a temporary one.
IMAGE_SITE = "/opt/extproc"
START_TIMEOUT_S = 90.0


def _run(argv: list[str], timeout: float = 300.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would point Python or the CLI elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "EXTPROC_", "PIP_TARGET", "PIP_PREFIX")) and k not in {"VIRTUAL_ENV"}
    }
    env.update(extra)
    return env


# --- docker/Dockerfile, through Docker's own parser ---------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str  # an image reference, or an earlier stage's name
    instructions: list[Any]


@dataclass
class Dockerfile:
    stages: list[Stage]

    @classmethod
    def parse(cls) -> Dockerfile:
        import dockerfile  # PyPI `dockerfile`: Docker's (moby/buildkit) Go parser

        stages: list[Stage] = []
        for command in dockerfile.parse_file(str(DOCKERFILE)):
            if command.cmd.upper() == "FROM":
                value = list(command.value)
                name = value[2] if len(value) == 3 and value[1].upper() == "AS" else str(len(stages))
                stages.append(Stage(name, value[0], []))
            else:
                assert stages, f"{command.original!r} before any FROM"
                stages[-1].instructions.append(command)
        return cls(stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the earlier stages it is built FROM, nearest first."""
        out = [stage]
        names = {s.name for s in self.stages}
        while out[-1].base in names:
            out.append(self.stage(out[-1].base))
        return out

    @property
    def final(self) -> Stage:
        return self.stages[-1]  # what `docker build` without --target gives

    def final_stage_instruction(self, cmd: str) -> list[str]:
        for stage in self.chain(self.final):
            found = [c for c in stage.instructions if c.cmd.upper() == cmd]
            if found:
                assert found[-1].json, f"{cmd} must be in exec form: {found[-1].original}"
                return list(found[-1].value)
        raise AssertionError(f"the final stage has no {cmd}")

    def final_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for stage in reversed(self.chain(self.final)):
            for command in stage.instructions:
                if command.cmd.upper() == "ENV":
                    pairs = list(command.value)
                    env.update(zip(pairs[::2], pairs[1::2], strict=True))
        return env

    def healthcheck(self) -> list[str]:
        (command,) = [c for c in self.final.instructions if c.cmd.upper() == "HEALTHCHECK"]
        assert command.json and command.value[0].upper() == "CMD", f"not exec form: {command.original}"
        return list(command.value[1:])

    def runs(self, stage: Stage) -> list[str]:
        return [c.value[0] for c in stage.instructions if c.cmd.upper() == "RUN"]

    def builder_installs(self) -> list[list[str]]:
        """The runtime's `pip install`s, in order, in the stage the final one copies IMAGE_SITE from."""
        (copy,) = [c for c in self.final.instructions if c.cmd.upper() == "COPY" and IMAGE_SITE in c.value]
        (source,) = [f.split("=", 1)[1] for f in copy.flags if f.startswith("--from=")]
        return [
            shlex.split(part.strip())
            for run in self.runs(self.stage(source))
            for part in run.split("&&")
            if part.strip().startswith("pip install")
        ]

    def builder_install(self) -> tuple[list[str], list[str]]:
        """The two installs: the locked dependencies (hashes required), then the wheel without dependencies."""
        installs = self.builder_installs()
        assert len(installs) == 2, installs
        locked, wheel = installs
        return locked, wheel


# --- the runtime wheel --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime wheel, built as the image's builder builds it (its environment: the compiled form)."""
    out = tmp_path_factory.mktemp("wheel")
    # setuptools builds in-tree: its build/ and egg-info go to the temporary directory instead, so a
    # stale build/lib from an earlier build cannot leak into this wheel, and the tree is left alone.
    extra = out / "setuptools.cfg"
    extra.write_text(f"[build]\nbuild_base = {out / 'build'}\n[egg_info]\negg_base = {out}\n")
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--disable-pip-version-check",
            "-w",
            str(out / "dist"),
            ".",
        ],
        cwd=ROOT,
        env={**os.environ, "DIST_EXTRA_CONFIG": str(extra), **image_wheel_env()},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (out / "dist").glob("extproc-*.whl")
    return built


def image_wheel_env() -> dict[str, str]:
    """The variables the Dockerfile's `pip wheel ... .` line sets (EXTPROC_COMPILE=1: the compiled form)."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    assignments = r"((?:(?<=\s)[A-Z_][A-Z0-9_]*=\S+\s+)*)"
    (line,) = re.findall(assignments + r"pip wheel --no-deps --wheel-dir /wheels \.(?:\s|$)", text)
    return dict(pair.split("=", 1) for pair in line.split())


def test_the_image_builds_the_compiled_form() -> None:
    assert image_wheel_env() == {"EXTPROC_COMPILE": "1"}


def test_wheel_holds_the_runtime_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names}
    # The compiled form: one extension module per compiled module, plus mypyc's shared runtime beside them.
    shared = {n for n in packages if n.endswith(".so") and "__mypyc" in n}
    assert packages == {"extproc", next(n for n in packages if n.endswith(".dist-info")), *shared}, packages
    compiled = image_wheel_env().get("EXTPROC_COMPILE") == "1"
    assert len(shared) == (1 if compiled else 0)
    for path in COMPILED_MODULES:
        built = any(n.startswith(path.removesuffix(".py") + ".cpython-") and n.endswith(".so") for n in names)
        assert built == compiled, path
    assert "extproc/examples/policy.yaml" in names
    assert "extproc/py.typed" in names
    assert "extproc/__main__.py" in names  # the image's entrypoint is `python3 -m extproc`
    assert "extproc/healthcheck.py" in names
    # The development tools' modules, by name, wherever they might have been put.
    dev_tools = re.compile(r"(extproc_dev|bench|fake_vllm|stack|null_processor|mesh_assets)(\.py|/)")
    assert [n for n in names if dev_tools.search(n)] == []
    assert [n for n in names if "__pycache__" in n or n.endswith(".pyc")] == []

    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(metadata_name).decode())
    requirements = metadata.get_all("Requires-Dist") or []
    required = {re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in requirements}
    assert "grpcio-health-checking" in required  # `extproc health` needs it at run time
    assert "aiohttp" not in required
    entry_points_name = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(entry_points_name).decode()
    assert "extproc.commands" not in entry_points  # the runtime registers no development commands


# --- the wheel installed: a clean venv, and the image's own layout -----------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class Probe:
    """The health command of an installation, pointed at a server: extra arguments are appended.

    It runs in `cwd`, away from the repository: `python -m` puts the working directory first on
    sys.path, where the source tree's `extproc` would shadow the installed one.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([*self.argv, *args], timeout=30, env=self.env, cwd=self.cwd)


def _start(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd)


def _wait_serving(server: Server, probe: Probe) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        result = probe("--timeout", "1")
        if result.returncode == 0:
            return
        # 1 is "not serving (yet)"; 2 is argparse refusing the command line, which no wait will change.
        assert result.returncode == 1, f"the health command failed: {result.stderr}"
        assert server.process.poll() is None, f"the server exited:\n{server.tail()}"
        assert time.monotonic() < deadline, (
            f"not SERVING after {START_TIMEOUT_S:.0f}s: {result.stderr}\n{server.tail()}"
        )
        time.sleep(0.3)


def _image_install_args(install: list[str], wheel: Path, target: Path | None) -> list[str]:
    """A builder `pip install`'s arguments with the image's paths mapped to here (run from the repository root).

    target None: the `--target` is dropped (a venv's own site-packages instead); nothing else changes.
    """
    assert install[:2] == ["pip", "install"], install
    args = install[2:]
    if target is None:
        at = args.index("--target")
        args = args[:at] + args[at + 2 :]
    return [str(target) if a == IMAGE_SITE else str(wheel) if a.startswith("/wheels/extproc-") else a for a in args]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv, no extras, installed as the image is: the locked dependencies (hashes required), then
    the wheel with --no-deps. `pip check` then proves the lock holds every dependency the wheel declares."""
    home = tmp_path_factory.mktemp("venv")
    result = _run([sys.executable, "-m", "venv", str(home / "venv")])
    assert result.returncode == 0, result.stderr
    python = home / "venv" / "bin" / "python"
    for install in Dockerfile.parse().builder_install():
        args = _image_install_args(install, wheel, None)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
        result = _run(pip, env=_clean_env(), cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    check = _run([str(python), "-m", "pip", "check"], env=_clean_env())
    assert check.returncode == 0, check.stdout + check.stderr
    return home / "venv"


def test_clean_venv_serves_and_reports_healthy(venv: Path, tmp_path: Path) -> None:
    python, extproc = str(venv / "bin" / "python"), str(venv / "bin" / "extproc")
    env = _clean_env()
    address = f"127.0.0.1:{free_port()}"
    # The example policy is the default; the access log is off so the log holds only the server's lines.
    log = tmp_path / "serve.log"
    server = Server(_start([extproc, "serve", "--listen", address, "--access-log", "off"], log, env, tmp_path), log)
    try:
        probe = Probe([extproc, "health", "--address", address], env, tmp_path)
        _wait_serving(server, probe)
        for service in ("", EXT_PROC_SERVICE):
            result = probe("--service", service)
            assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
        # It tells a healthy server from an unknown service name and from no server at all.
        unknown = probe("--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr, unknown.stdout + unknown.stderr
        nobody = Probe([extproc, "health", "--address", f"127.0.0.1:{free_port()}"], env, tmp_path)("--timeout", "1")
        assert nobody.returncode == 1 and "UNAVAILABLE" in nobody.stderr, nobody.stdout + nobody.stderr
    finally:
        code = server.stop()
    assert code == 0, server.tail()

    # What ran is the installed wheel, and nothing of the development tools came with it.
    where = _run([python, "-c", "import extproc; print(extproc.__file__)"], env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    for module in ("aiohttp", "extproc_dev"):
        result = _run([python, "-c", f"import {module}"], env=env, cwd=tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (module, result.stderr)
    dev = _run([extproc, "dev"], env=env, cwd=tmp_path)
    assert dev.returncode == 2 and "invalid choice: 'dev'" in dev.stderr, dev.stderr


@pytest.fixture(scope="module")
def image_site(wheel: Path, venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's `pip install` of the runtime, run here into a temporary stand-in for /opt/extproc."""
    site = tmp_path_factory.mktemp("image") / "opt-extproc"
    # The same installs in the same order, only the paths differ; the clean venv's pip runs them.
    for install in Dockerfile.parse().builder_install():
        args = _image_install_args(install, wheel, site)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", *args]
        result = _run(pip, env=_clean_env(), cwd=ROOT)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return site


def test_image_layout_serves_with_its_entrypoint_env_and_healthcheck(image_site: Path, tmp_path: Path) -> None:
    """The runtime stage's ENTRYPOINT, ENV and HEALTHCHECK, run on a Python without site-packages.

    Distroless' Python has nothing but the standard library besides what the image copies, so `-S`
    (no site-packages at all) with the image's PYTHONPATH stands in for it. Only the paths and the
    ports differ, the ports so that nothing else listening on this machine is in the way.
    """
    image = Dockerfile.parse()
    base_python = getattr(sys, "_base_executable", sys.executable)

    def python(argv: list[str]) -> list[str]:
        assert argv[0] == "python3", argv
        return [base_python, "-S", *argv[1:]]

    grpc_port, metrics_port = free_port(), free_port()
    env = _clean_env(**image.final_env())
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(IMAGE_SITE, str(image_site))
    image_grpc = f":{mesh_assets.EXTPROC_GRPC_PORT}"
    assert env["EXTPROC_LISTEN"].endswith(image_grpc)
    env["EXTPROC_LISTEN"] = env["EXTPROC_LISTEN"].removesuffix(image_grpc) + f":{grpc_port}"
    env["EXTPROC_METRICS_PORT"] = str(metrics_port)
    healthcheck = [a.replace(image_grpc, f":{grpc_port}") for a in image.healthcheck()]

    log = tmp_path / "serve.log"
    server = Server(_start(python(image.final_stage_instruction("ENTRYPOINT")), log, env, tmp_path), log)
    try:
        _wait_serving(server, Probe(python(healthcheck), env, tmp_path))
        # The ENV's metrics port serves too: the other port the image EXPOSEs.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"extproc_" in response.read()
        # The packages came from the stand-in directory alone.
        script = "import extproc, grpc; print(extproc.__file__, grpc.__file__)"
        where = _run(python(["python3", "-c", script]), env=env, cwd=tmp_path)
        paths = where.stdout.split()
        assert len(paths) == 2 and all(p.startswith(str(image_site)) for p in paths), where.stdout + where.stderr
    finally:
        code = server.stop()
    assert code == 0, server.tail()


# --- the Dockerfile's rules ---------------------------------------------------------------------------


def test_dockerfile_stages_and_pins() -> None:
    image = Dockerfile.parse()
    names = [s.name for s in image.stages]
    assert len(names) == len(set(names))
    assert {"builder", "dev", "runtime"} <= set(names), names
    assert image.final.name == "runtime"
    stage_names = set(names)
    for stage in image.stages:
        if stage.base in stage_names:
            assert names.index(stage.base) < names.index(stage.name)
            continue
        reference = stage.base
        repository, _, digest = reference.partition("@")
        image_name, _, tag = repository.rpartition(":")
        assert image_name and "/" not in tag, f"{reference}: no tag"
        assert tag != "latest" and "$" not in reference, f"{reference}: not pinned"
        # A version in the tag; images that publish no version tags (distroless) are pinned by digest.
        assert re.search(r"\d+\.\d+\.\d+", tag) or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), reference
    builder = image.stage("builder")
    assert re.fullmatch(r"python:3\.11\.\d+-(slim-)?bookworm", builder.base), builder.base
    (root,) = {s.base for s in image.chain(image.final) if s.base not in stage_names}
    assert root.startswith("gcr.io/distroless/python3-debian12:"), root


def test_dockerfile_runtime_stage() -> None:
    image = Dockerfile.parse()
    chain = image.chain(image.final)
    # Distroless: no shell, so nothing may RUN in the final image's stages.
    assert [image.runs(s) for s in chain] == [[] for _ in chain]
    users = [c.value[0] for s in reversed(chain) for c in s.instructions if c.cmd.upper() == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not gid or (gid.isdigit() and int(gid) != 0), users[-1]
    assert image.final_stage_instruction("ENTRYPOINT") == ["python3", "-m", "extproc", "serve"]
    exposed = {int(p) for s in chain for c in s.instructions if c.cmd.upper() == "EXPOSE" for p in c.value}
    assert exposed == {mesh_assets.EXTPROC_GRPC_PORT, mesh_assets.EXTPROC_METRICS_PORT}
    env = image.final_env()
    assert env["PYTHONPATH"].split(":")[0] == IMAGE_SITE
    assert env["EXTPROC_LISTEN"] == f"0.0.0.0:{mesh_assets.EXTPROC_GRPC_PORT}"
    assert env["EXTPROC_METRICS_PORT"] == str(mesh_assets.EXTPROC_METRICS_PORT)
    health = image.healthcheck()
    assert health[:4] == ["python3", "-m", "extproc", "health"], health
    # The dev target: the same distroless Python, running nothing at build time either.
    dev_chain = image.chain(image.stage("dev"))
    assert dev_chain[-1].base == chain[-1].base
    assert [image.runs(s) for s in dev_chain] == [[] for _ in dev_chain]
    dev_entrypoint = [c.value for s in dev_chain for c in s.instructions if c.cmd.upper() == "ENTRYPOINT"]
    assert dev_entrypoint[0] == ("python3", "-m", "extproc")


def test_dockerfile_installs_the_runtime_from_the_hashed_lock() -> None:
    image = Dockerfile.parse()
    locked, wheel = image.builder_install()
    for install in (locked, wheel):
        assert "--target" in install and install[install.index("--target") + 1] == IMAGE_SITE, install
        assert "--no-deps" in install, install  # nothing resolved beyond the lock
    # The dependencies: the lock alone, every download checked against its hashes, wheels only.
    assert "--require-hashes" in locked and "--only-binary=:all:" in locked, locked
    assert locked[locked.index("-r") + 1] == "requirements/runtime.txt", locked
    assert [a for a in locked[2:] if not a.startswith("-") and a not in (IMAGE_SITE, "requirements/runtime.txt")] == []
    # The wheel: our build, and nothing else named.
    assert [a for a in wheel[2:] if not a.startswith("-") and a != IMAGE_SITE] == ["/wheels/extproc-*.whl"], wheel
    # The lock reaches the builder, before the install that reads it.
    builder = image.stage("builder")
    copies = [c for c in builder.instructions if c.cmd.upper() == "COPY" and "requirements/runtime.txt" in c.value]
    runs = [c for c in builder.instructions if c.cmd.upper() == "RUN" and "requirements/runtime.txt" in c.value[0]]
    assert copies and runs and builder.instructions.index(copies[0]) < builder.instructions.index(runs[0])


def test_dockerfile_installs_no_extras_and_copies_existing_sources() -> None:
    image = Dockerfile.parse()
    for install in image.builder_install():
        assert "--target" in install and install[install.index("--target") + 1] == IMAGE_SITE
    for stage in image.stages:
        for run in image.runs(stage):
            for part in run.split("&&"):
                if "pip install" in part:
                    # `.[dev]`, `extproc[fast]`, ...: an extra in any requirement of any install.
                    assert not re.search(r"\S\[[\w,.\s-]+\]", part), part
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert ignore[0] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = [
        source
        for stage in image.stages
        for c in stage.instructions
        if c.cmd.upper() == "COPY" and not any(f.startswith("--from=") for f in c.flags)
        for source in c.value[:-1]
    ]
    assert sources, "no COPY from the context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source.split("/")[0] in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"


# --- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compose-schema")
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            str(out),
            COMPOSE_SCHEMA_WHEEL,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (downloaded,) = out.glob("docker_compose-*.whl")
    schema: dict[str, Any] = json.loads(zipfile.ZipFile(downloaded).read(COMPOSE_SCHEMA_MEMBER))
    return schema


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


def _schema_errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    import jsonschema

    # The draft the schema declares ($schema 2019-09, spelt with a trailing "#" jsonschema does not look up).
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_spec(compose_schema: dict[str, Any]) -> None:
    document = _compose()
    assert _schema_errors(compose_schema, document) == []
    # The schema bites: a misspelt key is an error.
    broken = json.loads(json.dumps(document))
    broken["services"]["extproc"]["healthcheck"]["intervall"] = "5s"
    assert _schema_errors(compose_schema, broken)


def test_compose_stack_matches_the_policy_and_the_images() -> None:
    document = _compose()
    services: dict[str, Any] = document["services"]
    policy = load_policy(example_policy_path())

    fakes = {name for name in services if name.startswith("vllm-")}
    assert fakes == {mesh_assets.vllm_service(b) for b in policy.backends}
    for backend in policy.backends:
        service = services[mesh_assets.vllm_service(backend)]
        assert service["build"]["target"] == "dev"
        command = service["command"]
        assert command[0] == "fake-vllm"
        options = dict(zip(command[1::2], command[2::2], strict=False))
        assert options["--host"] == "0.0.0.0"
        assert options["--port"] == str(mesh_assets.VLLM_PORT)
        assert options["--name"] == policy.subset(backend)
        assert service["healthcheck"]["test"][0] == "CMD"

    gateway = services[compose.EXTPROC_SERVICE]
    assert gateway["build"]["target"] == "runtime"
    assert gateway["healthcheck"]["test"] == [
        "CMD",
        *["python3", "-m", "extproc", "health", "--address", f"127.0.0.1:{mesh_assets.EXTPROC_GRPC_PORT}"],
    ]
    assert gateway["command"] == [f"--load-url={b}={compose.load_url(b)}" for b in policy.backends]
    assert gateway["environment"]["EXTPROC_REDIS_URL"].startswith(f"redis://{compose.REDIS_SERVICE}:")
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = (COMPOSE_FILE.parent / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert build["target"] in {s.name for s in Dockerfile.parse().stages}, name
        else:
            repository, _, tag = service["image"].rpartition(":")
            assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+(-[\w.-]+)?", tag), f"{name}: {service['image']}"
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health"

    envoy = services["envoy"]
    assert f"./{ENVOY_CONFIG.name}:{compose.ENVOY_CONFIG_MOUNT}:ro" in envoy["volumes"]
    command = envoy["command"]
    assert command[command.index("-c") + 1] == compose.ENVOY_CONFIG_MOUNT
    assert set(envoy["depends_on"]) == {compose.EXTPROC_SERVICE, *fakes}
    # The image's Envoy is the one the tests validate the bootstrap with.
    version = _run([envoy_binary(), "--version"]).stdout
    minor = re.search(r"/(\d+\.\d+)\.\d+/", version)
    assert minor and envoy["image"].startswith(f"envoyproxy/envoy:v{minor.group(1)}."), (envoy["image"], version)


def test_envoy_config_is_generated_and_names_compose_services() -> None:
    assert ENVOY_CONFIG.read_text() == compose.compose_envoy_config(), "stale: run `extproc mesh-assets`"
    services = _compose()["services"]
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["type"] == "STRICT_DNS"
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                address = endpoint["endpoint"]["address"]["socket_address"]
                assert address["address"] in services, cluster["name"]
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    policy = load_policy(example_policy_path())
    timeout_ms = filter_contract.message_timeout_ms(policy)
    assert hcm["http_filters"][0] == filter_contract.ext_proc_filter(EXTPROC_CLUSTER, timeout_ms)
    # Both of Envoy's ports are published, on the host's loopback only.
    ports = [
        listener["address"]["socket_address"]["port_value"],
        config["admin"]["address"]["socket_address"]["port_value"],
    ]
    assert {f"127.0.0.1:{p}:{p}" for p in ports} <= set(services["envoy"]["ports"])


def test_local_stack_bootstrap_keeps_static_loopback_clusters() -> None:
    """The DNS clusters are only for names: the local stack's IP upstreams stay STATIC, admin on loopback."""
    config = yaml.safe_load(
        render(EnvoySetup(10000, 9901, [Upstream("a", 10001), Upstream("b", 10002, host="::1")], extproc_port=50051))
    )
    clusters = config["static_resources"]["clusters"]
    assert [c["type"] for c in clusters] == ["STATIC"] * 3
    assert all("dns_lookup_family" not in c for c in clusters)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


@pytest.mark.envoy
def test_envoy_accepts_the_compose_bootstrap() -> None:
    # --mode validate builds every listener and cluster without resolving the names.
    result = _run([envoy_binary(), "--mode", "validate", "-c", str(ENVOY_CONFIG)], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr
