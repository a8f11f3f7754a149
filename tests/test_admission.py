"""In-flight caps per backend (`extproc.inflight`) and the admission queue in front of them (`extproc.admission`)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import mmap
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

from extproc.admission import AdmissionQueue, Shed, Slot
from extproc.inflight import InFlightTableFull, LocalInFlight, SharedInFlight

B = "vllm-a"


# --- helpers -----------------------------------------------------------------------------------


def _fork(child: Callable[[], None]) -> int:
    """Run `child` in a forked process that never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait_exit(pid: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit")


def _read_line(fd: int, lines: int = 1, timeout_s: float = 5.0) -> bytes:
    """`lines` newline-terminated messages from a pipe, or fail (never hang the suite)."""
    buf = b""
    deadline = time.monotonic() + timeout_s
    while buf.count(b"\n") < lines:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            raise AssertionError("no message from the child")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError("the child closed its pipe")
        buf += chunk
    return buf


@contextlib.contextmanager
def _shared(max_workers: int, max_backends: int = 128) -> Iterator[SharedInFlight]:
    counter = SharedInFlight.create(max_workers, max_backends)
    try:
        yield counter
    finally:
        counter.close()


def _queue(counter: LocalInFlight | SharedInFlight | None = None, poll_interval_s: float = 0.005) -> AdmissionQueue:
    return AdmissionQueue(counter if counter is not None else LocalInFlight(), poll_interval_s=poll_interval_s)


async def _acquire(
    queue: AdmissionQueue,
    priority: int = 0,
    tenant: str = "t",
    cap: int | None = 1,
    max_wait_s: float = 5.0,
    max_queue: int = 100,
) -> Slot:
    return await queue.acquire(B, cap, priority, tenant, max_wait_s=max_wait_s, max_queue=max_queue)


async def _served_in_order(queue: AdmissionQueue, specs: list[tuple[str, int, str]]) -> list[str]:
    """Hold the one slot, queue `specs` (name, priority, tenant) in order, then let them through one by one."""
    holder = await _acquire(queue)
    order: list[str] = []

    async def waiter(name: str, priority: int, tenant: str) -> None:
        slot = await _acquire(queue, priority, tenant)
        order.append(name)
        queue.release(slot)  # hands the slot straight to the next head waiter

    tasks = []
    for name, priority, tenant in specs:
        tasks.append(asyncio.create_task(waiter(name, priority, tenant)))
        await asyncio.sleep(0)  # queued in this order
    assert sum(queue.waiting(B).values()) == len(specs)
    queue.release(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    return order


def _assert_idle(queue: AdmissionQueue, total: int = 0) -> None:
    assert queue.waiting(B) == {}
    assert queue._backends == {}  # no state, so no poll timer left behind
    assert queue.counter.total(B) == total


# --- counters in one process -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_counter_cap_release_total(kind: str) -> None:
    counter: LocalInFlight | SharedInFlight = LocalInFlight() if kind == "local" else SharedInFlight.create(4)
    try:
        counter.bind_worker(0)
        assert counter.total(B) == 0
        assert counter.try_acquire(B, 2)
        assert counter.try_acquire(B, 2)
        assert not counter.try_acquire(B, 2)
        assert counter.try_acquire("other", 1)
        assert counter.total(B) == 2
        counter.release(B)
        assert counter.total(B) == 1
        assert counter.try_acquire(B, 2)
        counter.release(B)
        counter.release(B)
        counter.release(B)  # one too many: ignored, never negative
        assert counter.total(B) == 0
        assert counter.total("other") == 1
        counter.reset_worker(0)
        assert counter.total("other") == 0
    finally:
        counter.close()


@pytest.mark.parametrize("kind", ["local", "shared"])
def test_uncapped_add_counts_beside_capped_acquires(kind: str) -> None:
    counter: LocalInFlight | SharedInFlight = LocalInFlight() if kind == "local" else SharedInFlight.create(4)
    try:
        counter.bind_worker(0)
        for _ in range(3):
            counter.add(B)  # no cap: always counted
        assert counter.total(B) == 3
        assert not counter.try_acquire(B, 3)  # a cap sees what was added
        assert counter.try_acquire(B, 4)
        for _ in range(5):
            counter.release(B)
        assert counter.total(B) == 0
        counter.add("fresh")  # registers the name, as try_acquire does
        assert counter.total("fresh") == 1
    finally:
        counter.close()


def test_shared_uncapped_add_never_waits_for_the_lock() -> None:
    """The lock exists for the cap's check-then-count; an uncapped request has no cap to check,
    so another worker holding the table's lock never holds it up."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with _shared(2) as counter:
        counter.bind_worker(0)
        counter.add(B)  # registered before the fork: registering takes the lock

        def holder() -> None:
            fcntl.lockf(counter._fd, fcntl.LOCK_EX)
            os.write(ready_w, b"held\n")
            os.read(done_r, 1)  # holds the lock until told

        pid = _fork(holder)
        # In a thread: an add that waits for the lock fails the test instead of hanging the suite.
        adding = threading.Thread(target=counter.add, args=(B,))
        try:
            _read_line(ready_r)
            adding.start()
            adding.join(2)
            waited = adding.is_alive()
        finally:
            os.write(done_w, b"x")
            if adding.is_alive():
                adding.join(5)
        assert _wait_exit(pid) == 0
        assert not waited
        assert counter.held(B, 0) == 2
    for fd in (ready_r, ready_w, done_r, done_w):
        os.close(fd)


def test_shared_names_and_binding() -> None:
    with _shared(2, max_backends=2) as counter:
        with pytest.raises(RuntimeError, match="bind_worker"):
            counter.try_acquire(B, 1)
        with pytest.raises(ValueError):
            counter.bind_worker(2)
        counter.bind_worker(1)
        with pytest.raises(ValueError):
            counter.try_acquire("x" * 64, 1)
        assert counter.try_acquire("é" * 31, 1)  # 62 utf-8 bytes
        assert counter.total("never-used") == 0  # a read registers nothing
        assert counter.try_acquire(B, 1)
        with pytest.raises(InFlightTableFull):
            counter.try_acquire("third", 1)
        assert counter.backends() == ["é" * 31, B]
        assert counter.held(B, 1) == 1 and counter.held(B, 0) == 0


# --- the admission queue -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fast_path_does_not_suspend() -> None:
    queue = _queue()
    coro = queue.acquire(B, cap=1, priority=0, tenant="t", max_wait_s=1, max_queue=10)
    with pytest.raises(StopIteration) as done:
        coro.send(None)  # runs to completion without yielding to the loop
    slot = done.value.value
    assert slot == Slot(B)
    assert queue.counter.total(B) == 1
    queue.release(slot)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_uncapped_is_counted_never_queued() -> None:
    queue = _queue()
    slots = [await queue.acquire(B, cap=None, priority=9, tenant="t", max_wait_s=0, max_queue=0) for _ in range(50)]
    assert queue.counter.total(B) == 50
    for slot in slots:
        queue.release(slot)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_cap_holds_under_load() -> None:
    queue = _queue()
    cap, running, peak = 3, 0, 0

    async def request(i: int) -> None:
        nonlocal running, peak
        slot = await _acquire(queue, priority=i % 3, tenant=f"t{i % 4}", cap=cap)
        running += 1
        peak = max(peak, running)
        assert queue.counter.total(B) <= cap
        for _ in range(i % 5 + 1):
            await asyncio.sleep(0)
        running -= 1
        queue.release(slot)

    await asyncio.wait_for(asyncio.gather(*(request(i) for i in range(60))), 5)
    assert peak == cap
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_strict_priority() -> None:
    order = await _served_in_order(_queue(), [("batch", 5, "t"), ("lower", 9, "t"), ("interactive", 0, "t")])
    assert order == ["interactive", "batch", "lower"]


@pytest.mark.asyncio
async def test_round_robin_across_tenants() -> None:
    specs = [(f"A{i}", 1, "A") for i in range(10)] + [("B0", 1, "B")]
    order = await _served_in_order(_queue(), specs)
    assert order == ["A0", "B0"] + [f"A{i}" for i in range(1, 10)]

    specs = [("A0", 1, "A"), ("A1", 1, "A"), ("A2", 1, "A"), ("B0", 1, "B"), ("B1", 1, "B"), ("C0", 1, "C")]
    order = await _served_in_order(_queue(), specs)
    assert order == ["A0", "B0", "C0", "A1", "B1", "A2"]


@pytest.mark.asyncio
async def test_fifo_within_tenant() -> None:
    order = await _served_in_order(_queue(), [(f"r{i}", 2, "same") for i in range(8)])
    assert order == [f"r{i}" for i in range(8)]


@pytest.mark.asyncio
async def test_queue_full_refuses_lower_and_evicts_for_higher() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    b1 = asyncio.create_task(_acquire(queue, priority=5, tenant="x", max_queue=2))
    await asyncio.sleep(0)
    b2 = asyncio.create_task(_acquire(queue, priority=5, tenant="y", max_queue=2))
    await asyncio.sleep(0)
    assert queue.waiting(B) == {5: 2}

    for priority in (5, 7):  # equal or lower than the lowest waiter: refused at once
        with pytest.raises(Shed) as refused:
            await _acquire(queue, priority=priority, max_queue=2)
        assert refused.value.reason == "queue_full"

    interactive = asyncio.create_task(_acquire(queue, priority=0, tenant="x", max_queue=2))
    await asyncio.sleep(0)
    with pytest.raises(Shed) as evicted:
        await b2  # the newest waiter of the lowest priority made room
    assert evicted.value.reason == "queue_full"
    assert not b1.done()
    assert queue.waiting(B) == {0: 1, 5: 1}

    queue.release(holder)
    slot = await interactive
    assert not b1.done()
    queue.release(slot)
    queue.release(await b1)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_max_queue_zero_and_no_wait() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    with pytest.raises(Shed) as full:
        await _acquire(queue, max_queue=0)
    assert full.value.reason == "queue_full"
    with pytest.raises(Shed) as timeout:
        await _acquire(queue, max_wait_s=0)
    assert timeout.value.reason == "queue_timeout"
    queue.release(holder)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_queue_timeout() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    patient = asyncio.create_task(_acquire(queue, tenant="p", max_wait_s=5))
    started = time.monotonic()
    with pytest.raises(Shed) as shed:
        await _acquire(queue, tenant="q", max_wait_s=0.05)
    assert shed.value.reason == "queue_timeout"
    assert 0.04 <= shed.value.waited_s < 1
    assert time.monotonic() - started >= 0.04
    assert queue.waiting(B) == {0: 1}  # only the patient one is left
    queue.release(holder)
    queue.release(await patient)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_the_queue() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    waiter = asyncio.create_task(_acquire(queue))
    await asyncio.sleep(0)
    assert queue.waiting(B) == {0: 1}
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting(B) == {}
    assert queue._backends == {}  # its poll timer is gone too
    queue.release(holder)
    _assert_idle(queue)

    # Cancelled by a timeout around it (as a deadline on the whole request would).
    holder = await _acquire(queue)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_acquire(queue), 0.02)
    queue.release(holder)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_cancel_right_after_being_handed_the_slot() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    first = asyncio.create_task(_acquire(queue, tenant="a"))
    second = asyncio.create_task(_acquire(queue, tenant="a"))
    await asyncio.sleep(0)
    queue.release(holder)  # the slot is first's now: its future is resolved, its task not yet resumed
    assert queue.waiting(B) == {0: 1}
    first.cancel()  # ...and the client goes away in that same loop turn
    with pytest.raises(asyncio.CancelledError):
        await first
    slot = await asyncio.wait_for(second, 1)  # the slot was passed on, not leaked
    assert queue.counter.total(B) == 1
    queue.release(slot)
    _assert_idle(queue)

    # Same, with nobody to pass it on to: it goes back to the counter.
    holder = await _acquire(queue)
    only = asyncio.create_task(_acquire(queue))
    await asyncio.sleep(0)
    queue.release(holder)
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_cancel_then_release_in_the_same_turn() -> None:
    queue = _queue()
    holder = await _acquire(queue)
    first = asyncio.create_task(_acquire(queue))
    second = asyncio.create_task(_acquire(queue))
    await asyncio.sleep(0)
    first.cancel()  # its future is cancelled, but it is still queued until its coroutine resumes
    queue.release(holder)  # must skip it
    with pytest.raises(asyncio.CancelledError):
        await first
    queue.release(await asyncio.wait_for(second, 1))
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_arrival_does_not_overtake_an_equal_waiter_for_a_freed_slot() -> None:
    counter = LocalInFlight()
    queue = _queue(counter, poll_interval_s=10)  # no poll in this test: only what arrivals do
    holder = await _acquire(queue)
    early = asyncio.create_task(_acquire(queue, tenant="a"))
    await asyncio.sleep(0)
    counter.release(B)  # as if another worker released: the counter has room, nobody was handed it
    assert holder.backend == B
    late = asyncio.create_task(_acquire(queue, tenant="b"))
    await asyncio.sleep(0)  # late queues, and hands the free slot to the head...
    await asyncio.sleep(0)  # ...which then runs
    assert early.done() and not late.done()  # the queue's head got the free slot
    urgent = asyncio.create_task(_acquire(queue, priority=-1, tenant="c", cap=2))
    await asyncio.sleep(0)
    assert urgent.done()  # higher priority than every waiter, and room (cap 2): straight in
    queue.release(await urgent)
    await asyncio.sleep(0)
    queue.release(await early)
    queue.release(await asyncio.wait_for(late, 1))
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_release_respects_a_lowered_cap() -> None:
    queue = _queue(poll_interval_s=10)
    first = await _acquire(queue, cap=2)
    second = await _acquire(queue, cap=2)
    waiter = asyncio.create_task(_acquire(queue, cap=1))  # a policy reload lowered the cap to 1
    await asyncio.sleep(0)
    queue.release(first)  # 2 in flight > 1: not handed over
    await asyncio.sleep(0)
    assert not waiter.done() and queue.counter.total(B) == 1
    queue.release(second)  # 1 in flight, the cap: handed over
    slot = await asyncio.wait_for(waiter, 1)
    assert queue.counter.total(B) == 1
    queue.release(slot)
    _assert_idle(queue)


@pytest.mark.asyncio
async def test_poll_admits_when_the_counter_frees_up() -> None:
    counter = LocalInFlight()
    queue = _queue(counter, poll_interval_s=0.005)
    assert counter.try_acquire(B, 1)  # held outside this queue (another worker, say)
    waiter = asyncio.create_task(_acquire(queue))
    await asyncio.sleep(0.02)
    assert not waiter.done()
    counter.release(B)
    queue.release(await asyncio.wait_for(waiter, 1))
    await asyncio.sleep(0.02)
    _assert_idle(queue)
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- across real forked processes --------------------------------------------------------------


def test_cap_holds_across_forked_workers() -> None:
    workers, cap, run_s = 3, 2, 0.3
    # An independent witness: how many workers are inside the "holding" section at once,
    # counted under a lock of its own.
    witness_fd = os.memfd_create("witness")
    os.ftruncate(witness_fd, 16)
    witness_map = mmap.mmap(witness_fd, 16)
    witness = memoryview(witness_map).cast("q")
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    name = "hammered"  # not registered before the fork: the workers race to register it
    with _shared(workers) as counter:

        def hammer(index: int) -> None:
            counter.bind_worker(index)
            os.read(go_r, 1)
            acquired = refused = 0
            peak_total = 0
            end = time.monotonic() + run_s
            while time.monotonic() < end:
                if not counter.try_acquire(name, cap):
                    refused += 1
                    continue
                acquired += 1
                fcntl.lockf(witness_fd, fcntl.LOCK_EX)
                witness[0] += 1
                witness[1] = max(witness[1], witness[0])
                fcntl.lockf(witness_fd, fcntl.LOCK_UN)
                peak_total = max(peak_total, counter.total(name))
                for _ in range(50):  # hold it a moment
                    pass
                fcntl.lockf(witness_fd, fcntl.LOCK_EX)
                witness[0] -= 1
                fcntl.lockf(witness_fd, fcntl.LOCK_UN)
                counter.release(name)
            os.write(out_w, json.dumps([acquired, refused, peak_total]).encode() + b"\n")

        pids = [_fork(functools.partial(hammer, i)) for i in range(workers)]
        os.write(go_w, b"x" * workers)
        results = [json.loads(line) for line in _read_line(out_r, lines=workers).splitlines()]
        assert [_wait_exit(pid) for pid in pids] == [0] * workers
        assert len(results) == workers
        acquired = sum(r[0] for r in results)
        refused = sum(r[1] for r in results)
        assert acquired > 100 and refused > 0  # they did contend
        assert witness[1] <= cap  # never more than `cap` held at once
        assert witness[1] == cap  # and the cap was reached
        assert counter.backends() == [name]  # one registration, whoever won the race
        assert counter.total(name) == 0
        assert all(counter.held(name, i) == 0 for i in range(workers))
    witness.release()
    witness_map.close()
    for fd in (witness_fd, go_r, go_w, out_r, out_w):
        os.close(fd)


def test_reset_worker_frees_a_killed_workers_slots() -> None:
    ready_r, ready_w = os.pipe()
    with _shared(2) as counter:

        def worker() -> None:
            counter.bind_worker(1)
            assert counter.try_acquire(B, 3)
            assert counter.try_acquire(B, 3)
            os.write(ready_w, b"held\n")
            time.sleep(30)

        pid = _fork(worker)
        assert _read_line(ready_r) == b"held\n"
        os.kill(pid, signal.SIGKILL)
        assert _wait_exit(pid) == -signal.SIGKILL
        assert counter.total(B) == 2  # the dead worker's slots are still counted...
        counter.reset_worker(1)  # ...until the supervisor gives them back, before restarting it
        assert counter.total(B) == 0
        counter.bind_worker(0)
        assert counter.try_acquire(B, 1)
    os.close(ready_r)
    os.close(ready_w)


def test_a_worker_killed_holding_the_lock_does_not_wedge_the_others() -> None:
    ready_r, ready_w = os.pipe()
    with _shared(2) as counter:

        def worker() -> None:
            fcntl.lockf(counter._fd, fcntl.LOCK_EX)  # dies inside a critical section
            os.write(ready_w, b"locked\n")
            time.sleep(30)

        pid = _fork(worker)
        assert _read_line(ready_r) == b"locked\n"
        os.kill(pid, signal.SIGKILL)
        _wait_exit(pid)
        counter.bind_worker(0)
        assert counter.try_acquire(B, 1)  # the kernel dropped the dead process's lock
        counter.reset_worker(1)
    os.close(ready_r)
    os.close(ready_w)


def test_waiter_admitted_when_another_process_releases() -> None:
    holding_r, holding_w = os.pipe()
    go_r, go_w = os.pipe()
    with _shared(2) as counter:

        def other_worker() -> None:
            counter.bind_worker(1)
            assert counter.try_acquire(B, 1)
            os.write(holding_w, b"holding\n")
            os.read(go_r, 1)
            counter.release(B)

        pid = _fork(other_worker)
        assert _read_line(holding_r) == b"holding\n"
        counter.bind_worker(0)

        async def main() -> float:
            queue = AdmissionQueue(counter, poll_interval_s=0.005)
            assert not counter.try_acquire(B, 1)
            waiter = asyncio.create_task(queue.acquire(B, 1, 0, "t", max_wait_s=5, max_queue=10))
            await asyncio.sleep(0.03)
            assert not waiter.done() and queue.waiting(B) == {0: 1}
            released_at = time.monotonic()
            os.write(go_w, b"x")
            slot = await asyncio.wait_for(waiter, 2)
            latency = time.monotonic() - released_at
            assert counter.held(B, 0) == 1 and counter.total(B) == 1
            queue.release(slot)
            assert counter.total(B) == 0
            assert queue._backends == {}
            return latency

        latency = asyncio.run(main())
        assert _wait_exit(pid) == 0
        assert latency < 0.5
    for fd in (holding_r, holding_w, go_r, go_w):
        os.close(fd)
