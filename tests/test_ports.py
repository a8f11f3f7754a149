"""Port allocation for local stacks: never the same port twice, in one process or across processes."""

from __future__ import annotations

import subprocess
import sys

from extproc_dev import stack


def test_free_port_never_repeats_within_a_process(monkeypatch) -> None:
    # A tiny range makes a repeat certain if allocation only probed with bind().
    monkeypatch.setattr(stack, "_candidate_ports", lambda: range(11_000, 11_030))
    ports = [stack.free_port() for _ in range(20)]
    assert len(set(ports)) == 20


def test_a_port_claimed_by_another_process_is_not_handed_out(monkeypatch) -> None:
    monkeypatch.setattr(stack, "_candidate_ports", lambda: range(11_100, 11_103))
    # Another process claims whatever it is given from the same three-port range and stays alive.
    code = (
        "import sys; from extproc_dev import stack; "
        "stack._candidate_ports = lambda: range(11_100, 11_103); "
        "print(stack.free_port(), flush=True); sys.stdin.read()"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        theirs = int(other.stdout.readline())
        ours = {stack.free_port() for _ in range(2)}
        assert theirs not in ours
    finally:
        other.communicate("")
