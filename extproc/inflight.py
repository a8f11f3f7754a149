"""Per-backend in-flight counters: one process (`LocalInFlight`) or all workers of a replica (`SharedInFlight`).

A per-backend cap must hold per gateway replica, as Envoy's circuit breakers do, while
`extproc serve --workers N` forks N processes sharing the port. `SharedInFlight` keeps the
counters in one shared mapping created by the supervisor before it forks:

    header     8 x int64     magic, layout version, max_workers, max_backends, backends registered
    names      max_backends x 64 bytes   a length byte, then up to 63 bytes of utf-8
    counters   max_backends x max_workers x int64   backend-major: a backend's cells are contiguous

Each cell has a single writer, the worker it belongs to (the supervisor's `reset_worker` writes
a dead worker's row, before that worker is restarted). So:

- `release` is one store to this worker's own cell, with no lock. Counts of a capped backend
  only ever fall outside the lock, so a reader that sees a stale value sees too many in
  flight, never too few.
- `add`, for a backend with no cap, is one store to this worker's own cell with no lock
  either: nothing is decided on the sum, so an uncapped request pays no system call. A
  backend has a cap for every worker or for none, except while a reload that gives it one
  reaches the workers (and for the streams that began before it: a stream keeps its policy):
  then a request admitted under the old policy, which had no cap, can go over the new cap, as
  it would have had it come a moment earlier.
- `try_acquire` sums the backend's cells and increments its own under an exclusive
  `fcntl.lockf` lock on the mapping's file. Every increment of a capped backend happens under
  that lock, so the sum read inside it bounds the true total from above: the cap can never be
  exceeded. When an unlocked read already shows the backend at its cap, it is refused without
  the lock (no system call on the refusal path, which is what polling waiters hit).
- `lockf` (POSIX record) locks belong to a process, not to a file descriptor: a forked child
  shares the inherited descriptor yet excludes its parent and siblings, with no reopen after
  fork, and the kernel drops the lock of a process that dies holding it. (An `flock` lock
  belongs to an open file description shared across fork, so a child and its parent would both
  "hold" it.) The price: the lock does not exclude threads of one process. Use one instance
  from one thread per process (the event loop), as `AdmissionQueue` does.
- Names are registered under the lock on first use (so a policy reload can add backends) and
  never removed; each process caches name -> cell offset.

A worker killed while holding slots leaves its cells set: the supervisor calls
`reset_worker(index)` before restarting it, which gives them back.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
from typing import Protocol

from mypy_extensions import mypyc_attr

__all__ = ["InFlightCounter", "InFlightTableFull", "LocalInFlight", "SharedInFlight"]

NAME_BYTES = 63
_NAME_SLOT = 64
_HEADER_WORDS = 8
_MAGIC = int.from_bytes(b"EXPINFL1", "little")
_VERSION = 1
_H_MAGIC, _H_VERSION, _H_WORKERS, _H_BACKENDS, _H_REGISTERED = range(5)


class InFlightCounter(Protocol):
    """What `AdmissionQueue` needs: in-flight counts per backend, for this worker."""

    def bind_worker(self, index: int) -> None: ...

    def try_acquire(self, backend: str, cap: int) -> bool: ...

    def add(self, backend: str) -> None: ...

    def release(self, backend: str) -> None: ...

    def total(self, backend: str) -> int: ...

    def reset_worker(self, index: int) -> None: ...

    def backends(self) -> list[str]: ...

    def close(self) -> None: ...


@mypyc_attr(native_class=False)  # compiled, a native class cannot derive from RuntimeError
class InFlightTableFull(RuntimeError):
    """More distinct backend names than the shared table was sized for (`max_backends`)."""


def _encode_name(backend: str) -> bytes:
    raw = backend.encode()
    if not raw or len(raw) > NAME_BYTES:
        raise ValueError(f"backend name must be 1..{NAME_BYTES} utf-8 bytes: {backend!r}")
    return raw


class LocalInFlight:
    """In-flight counts of one process: a dict, no lock. Same API as `SharedInFlight`."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def bind_worker(self, index: int) -> None:
        pass

    def try_acquire(self, backend: str, cap: int) -> bool:
        counts = self._counts
        n = counts.get(backend, 0)
        if n >= cap:
            return False
        counts[backend] = n + 1
        return True

    def add(self, backend: str) -> None:
        counts = self._counts
        counts[backend] = counts.get(backend, 0) + 1

    def release(self, backend: str) -> None:
        counts = self._counts
        n = counts.get(backend, 0)
        if n > 0:
            counts[backend] = n - 1

    def total(self, backend: str) -> int:
        return self._counts.get(backend, 0)

    def backends(self) -> list[str]:
        return list(self._counts)

    def reset_worker(self, index: int) -> None:
        """There is one worker: every count is its."""
        self._counts.clear()

    def close(self) -> None:
        self._counts.clear()


class SharedInFlight:
    """Per-backend in-flight counters shared by the forked worker processes of one replica.

    The supervisor calls `create` before forking; each child calls `bind_worker(index)`
    (indexes unique among live workers, below `max_workers`) before its first `try_acquire` or `add`.
    """

    def __init__(self, fd: int, mm: mmap.mmap, max_workers: int, max_backends: int) -> None:
        self._fd = fd
        self._mm = mm
        self._words = memoryview(mm).cast("q")
        self._max_workers = max_workers
        self._max_backends = max_backends
        self._counters_at = _HEADER_WORDS + max_backends * _NAME_SLOT // 8
        self._bases: dict[str, int] = {}  # backend -> index of its worker 0 cell
        self._worker = -1

    @classmethod
    def create(cls, max_workers: int, max_backends: int = 128) -> SharedInFlight:
        if max_workers < 1 or max_backends < 1:
            raise ValueError("max_workers and max_backends must be >= 1")
        size = 8 * (_HEADER_WORDS + max_backends * max_workers) + max_backends * _NAME_SLOT
        try:
            fd = os.memfd_create("extproc-inflight")  # a file only in memory; fork inherits it
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self = cls(fd, mm, max_workers, max_backends)
        words = self._words
        words[_H_VERSION] = _VERSION
        words[_H_WORKERS] = max_workers
        words[_H_BACKENDS] = max_backends
        words[_H_REGISTERED] = 0
        words[_H_MAGIC] = _MAGIC
        return self

    @property
    def max_workers(self) -> int:
        return self._max_workers

    def bind_worker(self, index: int) -> None:
        """Make this process worker `index` (call in the child, after fork)."""
        if not 0 <= index < self._max_workers:
            raise ValueError(f"worker index {index} not in 0..{self._max_workers - 1}")
        self._worker = index

    def try_acquire(self, backend: str, cap: int) -> bool:
        """If fewer than `cap` are in flight to `backend` across all workers, count one more for this worker."""
        base = self._registered(backend)
        words = self._words
        end = base + self._max_workers
        if sum(words[base:end]) >= cap:  # unlocked: may be stale, but only ever too high
            return False
        fd = self._fd
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            if sum(words[base:end]) >= cap:
                return False
            words[base + self._worker] += 1
            return True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def add(self, backend: str) -> None:
        """Count one more in flight to `backend` for this worker, whatever the others hold (no cap)."""
        base = self._registered(backend)
        self._words[base + self._worker] += 1  # this worker's own cell: no other writer while it lives

    def _registered(self, backend: str) -> int:
        """The backend's first cell, registering its name on first use; only in a bound worker."""
        if self._worker < 0:
            raise RuntimeError("SharedInFlight: bind_worker() was not called in this process")
        base = self._bases.get(backend)
        return base if base is not None else self._lookup(backend, register=True)

    def release(self, backend: str) -> None:
        """Give back one slot this worker acquired or added for `backend` (a release without one is ignored)."""
        base = self._bases.get(backend)
        if base is None or self._worker < 0:
            return
        cell = base + self._worker
        words = self._words
        n = words[cell]
        if n > 0:
            words[cell] = n - 1  # this worker's own cell: no other writer while it lives

    def total(self, backend: str) -> int:
        """In flight to `backend` across all workers (unlocked read: a gauge, not a decision)."""
        base = self._bases.get(backend)
        if base is None:
            base = self._lookup(backend, register=False)
            if base < 0:
                return 0
        return sum(self._words[base : base + self._max_workers])

    def held(self, backend: str, index: int) -> int:
        """In flight to `backend` counted for worker `index`."""
        base = self._bases.get(backend)
        if base is None:
            base = self._lookup(backend, register=False)
            if base < 0:
                return 0
        return int(self._words[base + index])

    def reset_worker(self, index: int) -> None:
        """Zero the cells of worker `index`, which died: the supervisor calls it before restarting the worker."""
        if not 0 <= index < self._max_workers:
            raise ValueError(f"worker index {index} not in 0..{self._max_workers - 1}")
        words = self._words
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            for b in range(min(words[_H_REGISTERED], self._max_backends)):
                words[self._counters_at + b * self._max_workers + index] = 0
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def backends(self) -> list[str]:
        """Every backend name registered so far, by any worker."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            return [self._name_at(b) for b in range(self._words[_H_REGISTERED])]
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._bases.clear()
        self._words.release()
        self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1

    def _name_at(self, b: int) -> str:
        at = 8 * _HEADER_WORDS + b * _NAME_SLOT
        mm = self._mm
        return mm[at + 1 : at + 1 + mm[at]].decode()

    def _lookup(self, backend: str, *, register: bool) -> int:
        """The backend's first cell, registering the name if asked; -1 if absent and not registering."""
        raw = _encode_name(backend)
        words, mm = self._words, self._mm
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            registered = words[_H_REGISTERED]
            for b in range(registered):
                at = 8 * _HEADER_WORDS + b * _NAME_SLOT
                if mm[at] == len(raw) and mm[at + 1 : at + 1 + len(raw)] == raw:
                    break
            else:
                if not register:
                    return -1
                if registered >= self._max_backends:
                    raise InFlightTableFull(f"more than {self._max_backends} backends: cannot add {backend!r}")
                b = registered
                at = 8 * _HEADER_WORDS + b * _NAME_SLOT
                mm[at + 1 : at + 1 + len(raw)] = raw
                mm[at] = len(raw)
                words[_H_REGISTERED] = registered + 1  # its cells are zero: a fresh mapping, never reused
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        base = self._counters_at + b * self._max_workers
        self._bases[backend] = base
        return base
