"""Hot reload: notice a changed policy (or key file), compile it off the event loop, swap it in.

Kubernetes updates a mounted ConfigMap by swapping the `..data` symlink; people also edit
files in place. Both change what `os.stat` (which follows symlinks) reports for the path,
so a cheap poll of (device, inode, size, mtime) catches either. SIGHUP asks for a reload now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from extproc.compiled import CompiledPolicy, compile_policy
from extproc.policy import Policy, PolicyError, load_policy

log = logging.getLogger("extproc.reload")

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


def fingerprint(paths: list[str]) -> Fingerprint:
    prints = []
    for path in paths:
        try:
            st = os.stat(path)
            prints.append((path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            prints.append((path, 0, 0, -1, 0))
    return tuple(prints)


def restart_only_changes(old: Policy, new: Policy) -> list[str]:
    """Keys whose new value cannot take effect in a running server."""
    problems = []
    if new.gateway.max_body_bytes > old.gateway.max_body_bytes:
        # gRPC's message size limits are fixed when the server starts.
        problems.append(
            f"gateway.max_body_bytes: raising it ({old.gateway.max_body_bytes} -> {new.gateway.max_body_bytes}) "
            "needs a restart (the gRPC message limit is set at start); lowering it does not"
        )
    if new.gateway.backend_header != old.gateway.backend_header:
        # Envoy's routes match the old name: clients could set it while we no longer overwrite it.
        problems.append("gateway.backend_header: Envoy's routes match on it; change both and restart")
    if new.queue.max_wait_ms > old.queue.max_wait_ms:
        problems.append(
            f"queue.max_wait_ms: raising it ({old.queue.max_wait_ms} -> {new.queue.max_wait_ms}) needs Envoy's "
            "ext_proc message_timeout raised first (it must outlast the wait); restart with both changed"
        )
    if new.quotas.on_store_failure != old.quotas.on_store_failure:
        problems.append("quotas.on_store_failure: the quota store is built at start; restart to change it")
    return problems


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    message: str
    compiled: CompiledPolicy | None = None


def compile_file(path: str, current: Policy) -> ReloadResult:
    """Load, validate and compile; all the I/O of a reload, run in a worker thread."""
    try:
        policy = load_policy(path)
        problems = restart_only_changes(current, policy)
        if problems:
            return ReloadResult(False, f"{path}: refused\n  " + "\n  ".join(problems))
        return ReloadResult(True, f"{path}: reloaded", compile_policy(policy))
    except PolicyError as exc:
        return ReloadResult(False, str(exc))
    except (OSError, ValueError) as exc:
        return ReloadResult(False, f"{path}: {exc}")


class PolicyWatcher:
    """Polls the policy and its key files; compiles a changed policy and hands it to `apply`."""

    def __init__(
        self,
        path: str,
        current: Policy,
        apply: Callable[[CompiledPolicy], None],
        on_result: Callable[[ReloadResult], None] = lambda _result: None,
        interval_s: float = 1.0,
        seen: Fingerprint | None = None,
    ) -> None:
        self.path = str(Path(path))
        self.current = current
        self.apply = apply
        self.on_result = on_result
        self.interval_s = interval_s
        # What the files were when `current` was read: a worker started (or restarted) later
        # compares against that, so it catches a change made before it was born.
        self._seen = seen if seen is not None else fingerprint(self._paths(current))
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # successful ones, for tests and logs

    def _paths(self, policy: Policy) -> list[str]:
        return [self.path, *policy.auth.key_files]

    def request(self) -> None:
        """Reload now, changed or not (SIGHUP)."""
        self._seen = ()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="extproc-policy-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                # No interval: changes are picked up only when asked (SIGHUP).
                await asyncio.wait_for(self._wake.wait(), self.interval_s if self.interval_s > 0 else None)
            self._wake.clear()
            try:
                await self.check()
            except Exception:
                log.exception("policy reload failed")

    async def check(self) -> ReloadResult | None:
        now = fingerprint(self._paths(self.current))
        if now == self._seen:
            return None
        self._seen = now
        result = await asyncio.to_thread(compile_file, self.path, self.current)
        if result.ok:
            assert result.compiled is not None
            self.apply(result.compiled)
            self.current = result.compiled.policy
            # The key files may be new ones: watch what the new policy names.
            self._seen = fingerprint(self._paths(self.current))
            self.reloads += 1
            log.info("policy reloaded from %s (sha256 %s)", self.path, result.compiled.digest[:12])
        else:
            log.error("policy reload refused; the last good policy stays in force: %s", result.message)
        self.on_result(result)
        return result
