"""A private redis-server for tests: its own port, its own temp dir, never anyone else's database.

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        server.stop()      # an outage; data is saved first, as a restarted production Redis would have it
        server.restart()   # same port, same data

`stop(persist=False)` kills it instead: a crash that loses everything since the last save.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

from extproc_dev.stack import free_port


class RedisServerNotInstalled(RuntimeError):
    """No redis-server on PATH; callers may turn this into a skip."""


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerNotInstalled("redis-server is not on PATH: install it (apt-get install redis-server)")
    return found


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one RESP command on a fresh connection; the raw reply (b"" if the server hung up, as SHUTDOWN does)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        try:
            while not _complete(reply):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def _complete(reply: bytes) -> bool:
    header, crlf, body = reply.partition(b"\r\n")
    if not crlf:
        return False
    if header.startswith(b"$") and int(header[1:]) >= 0:
        return len(body) >= int(header[1:]) + 2
    return True  # simple string, error, integer or nil: one line


class RedisServer:
    def __init__(self, *, start_timeout_s: float = 10.0) -> None:
        self._binary = redis_server_binary()
        self._start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None  # chosen on the first start, then kept for restarts

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the Redis server has not been started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="extproc-redis-"))
        if self.port is not None:
            self._launch(self.port)
            return self
        # Another process may take a free port between our probe and the bind: try a few.
        for attempt in range(5):
            self.port = free_port()
            try:
                self._launch(self.port)
                return self
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def stop(self, *, persist: bool = True) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            assert self.port is not None
            if persist:
                try:
                    # Saves to our dir even though --save "" disables periodic snapshots.
                    command(self.port, "SHUTDOWN", "SAVE")
                except OSError:
                    process.terminate()
            else:
                process.kill()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop(persist=False)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _launch(self, port: int) -> None:
        assert self._dir is not None
        log = self._dir / "redis.log"
        argv = [
            self._binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(log),
        ]  # fmt: skip
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {process.returncode} on port {port}:\n{stderr}{tail}")
            try:
                # Ours, not some other server that took the port first; and done loading its snapshot.
                if f"process_id:{process.pid}\r\n".encode() in command(port, "INFO", "server", timeout=0.2) and (
                    command(port, "PING", timeout=0.2).startswith(b"+PONG")
                ):
                    self._process = process
                    # A test run that never reaches close() must not leave servers behind.
                    weakref.finalize(self, _kill, process)
                    return
            except OSError:
                pass
            time.sleep(0.01)
        process.kill()
        process.wait()
        raise RuntimeError(f"redis-server did not answer on port {port} within {self._start_timeout_s}s")
