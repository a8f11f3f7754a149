"""How long the authenticator takes to decide, by class of key: a benchmark that prints numbers.

    python -m extproc_dev.key_timing [--iterations 200000] [--keys 1000] [--seed 1]

Three classes of presented key, against a policy of `--keys` tenants:

- unknown: no stored digest shares its lookup prefix (what a guesser almost always sends);
- wrong:   a stored digest shares its lookup prefix but not the rest (built into the key table
           directly: finding such a key by search would take ~2^48 hashes);
- right:   a stored key.

What a timing attacker could use is a difference between unknown and wrong (it would tell them that a
stored digest starts with a given prefix); right vs the others is also shown, though the reply already
tells the caller whether the key was right. Each call is timed alone with `perf_counter_ns`, the classes
are interleaved in a shuffled order (so drift, frequency scaling and other processes hit all three alike),
and every class cycles through many distinct keys (so no single key's cache state decides).

Two tables: `Authenticator.lookup` (the decision) and `Authenticator.identify` (what a request pays,
including the 401 built for a refused key). Printed per class: n, mean, median, p90, p99 (ns); per
pair: Welch's t on the central 98% (raw means are at the mercy of a few preempted calls), and the
two-sample Kolmogorov-Smirnov D on everything with its asymptotic p-value. This is a measurement, not
a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from extproc import identity
from extproc.errors import GatewayError
from extproc.identity import Authenticator, hash_key
from extproc.policy import parse_policy

CLASSES = ("unknown", "wrong", "right")
_PREFIX = identity._PREFIX  # the authenticator's own lookup prefix (hex chars), so the "wrong" class stays wrong


@dataclass(frozen=True)
class Sample:
    name: str
    ns: list[int]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.ns)
        return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


@dataclass(frozen=True)
class KeyClasses:
    auth: Authenticator
    keys: dict[str, list[str]]  # class -> presented keys


def build(n_keys: int, n_probe: int, seed: int) -> KeyClasses:
    """A policy of n_keys tenants plus n_probe entries that share only the lookup prefix with a "wrong" key."""
    rng = random.Random(seed)
    right = [f"sk-right-{seed}-{i}-{rng.getrandbits(64):016x}" for i in range(n_keys)]
    wrong = [f"sk-wrong-{seed}-{i}-{rng.getrandbits(64):016x}" for i in range(n_probe)]
    tenants: dict[str, Any] = {
        f"t{i}": {"keys": [{"name": f"k{i}", "sha256": hash_key(key)}]} for i, key in enumerate(right)
    }
    for i, key in enumerate(wrong):
        digest = hash_key(key)
        # Same prefix, every later hex digit changed: the full comparison must fail.
        rest = "".join(f"{(int(c, 16) + 1) % 16:x}" for c in digest[_PREFIX:])
        tenants[f"w{i}"] = {"keys": [{"name": f"w{i}", "sha256": digest[:_PREFIX] + rest}]}
    policy = parse_policy(
        {
            "backends": {"b": {}},
            "models": [{"name": "m", "backend": "b", "max_model_len": 4096}],
            "tenants": tenants,
        }
    )
    auth = Authenticator(policy)
    stored = {key.sha256[:_PREFIX] for spec in policy.tenants.values() for key in spec.keys}
    unknown: list[str] = []
    while len(unknown) < max(n_keys, n_probe):
        key = f"sk-unknown-{seed}-{len(unknown)}-{rng.getrandbits(64):016x}"
        if hash_key(key)[:_PREFIX] not in stored:
            unknown.append(key)
    probe = right[: max(n_probe, 1)] if n_probe < n_keys else right
    return KeyClasses(auth, {"unknown": unknown, "wrong": wrong, "right": probe})


def _lookup(auth: Authenticator) -> Callable[[str], bool]:
    """The decision itself: hash, candidates, comparisons (no reply built)."""

    def decide(key: str) -> bool:
        return auth.lookup(key) is not None

    return decide


def _identify(auth: Authenticator) -> Callable[[str], bool]:
    """What a request pays: headers parsed, the decision, and the 401 built and raised when it fails."""

    def decide(key: str) -> bool:
        try:
            auth.identify({"authorization": f"Bearer {key}"})
        except GatewayError:
            return False
        return True

    return decide


DECIDERS: dict[str, Callable[[Authenticator], Callable[[str], bool]]] = {
    "lookup": _lookup,
    "identify": _identify,
}


def measure(classes: KeyClasses, decider: str, iterations: int, seed: int) -> dict[str, Sample]:
    """`iterations` timed decisions per class, interleaved in a shuffled order."""
    rng = random.Random(seed + 1)
    keys = classes.keys
    schedule = [(name, i % len(keys[name])) for name in CLASSES for i in range(iterations)]
    rng.shuffle(schedule)
    decide = DECIDERS[decider](classes.auth)
    expected = {"unknown": False, "wrong": False, "right": True}
    for name in CLASSES:  # warm-up, and a check that each class decides as it should
        for key in keys[name][:50]:
            if decide(key) is not expected[name]:
                raise AssertionError(f"a {name} key decided {not expected[name]}")
    out: dict[str, list[int]] = {name: [] for name in CLASSES}
    clock = time.perf_counter_ns
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection lands on whichever call is running: noise, not the authenticator
    try:
        for name, index in schedule:
            key = keys[name][index]
            start = clock()
            decide(key)
            out[name].append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Sample(name, ns) for name, ns in out.items()}


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t, its degrees of freedom, and a two-sided p-value (normal approximation: df is large here)."""
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a), statistics.variance(b)
    se = math.sqrt(va / len(a) + vb / len(b))
    if se == 0:
        return 0.0, float("inf"), 1.0
    t = (ma - mb) / se
    df = (va / len(a) + vb / len(b)) ** 2 / (
        (va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1) or float("inf")
    )
    return t, df, math.erfc(abs(t) / math.sqrt(2))


def ks(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov D and its asymptotic p-value."""
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        value = min(xs[i], ys[j])
        while i < n and xs[i] == value:
            i += 1
        while j < m and ys[j] == value:
            j += 1
        d = max(d, abs(i / n - j / m))
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    # Q_KS(lambda) = 2 sum (-1)^(k-1) exp(-2 k^2 lambda^2); 100 terms converge for any lambda > 0.
    p = 1.0 if lam < 1e-3 else 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(max(p, 0.0), 1.0)


def _trimmed(ns: Sequence[int], cut: float = 0.01) -> list[float]:
    ordered = [float(x) for x in sorted(ns)]
    k = int(len(ordered) * cut)
    return ordered[k : len(ordered) - k] if len(ordered) > 2 * k + 1 else ordered


def report(samples: dict[str, Sample], title: str) -> str:
    lines = [
        title,
        f"{'class':<8} {'n':>8} {'mean ns':>9} {'median ns':>10} {'p90 ns':>8} {'p99 ns':>8}",
    ]
    for name in CLASSES:
        s = samples[name]
        lines.append(
            f"{name:<8} {len(s.ns):>8} {statistics.fmean(s.ns):>9.0f} {s.quantile(0.5):>10.0f} "
            f"{s.quantile(0.9):>8.0f} {s.quantile(0.99):>8.0f}"
        )
    lines += [
        "",
        f"{'pair':<16} {'Welch t (98%)':>14} {'p':>9} {'KS D':>7} {'KS p':>9} {'median diff ns':>15}",
    ]
    for a, b in (("unknown", "wrong"), ("unknown", "right"), ("wrong", "right")):
        t, _, p = welch(_trimmed(samples[a].ns), _trimmed(samples[b].ns))
        d, kp = ks(samples[a].ns, samples[b].ns)
        diff = samples[a].quantile(0.5) - samples[b].quantile(0.5)
        lines.append(f"{a + ' vs ' + b:<16} {t:>14.2f} {p:>9.2g} {d:>7.3f} {kp:>9.2g} {diff:>15.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc_dev.key_timing", description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="timed decisions per class")
    parser.add_argument("--keys", type=int, default=1000, help="tenants (one key each) in the policy")
    parser.add_argument("--probe-keys", type=int, default=1000, help="distinct keys per class presented")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.iterations < 2 or args.keys < 1 or args.probe_keys < 1:
        parser.error("--iterations must be >= 2, --keys and --probe-keys >= 1")
    classes = build(args.keys, args.probe_keys, args.seed)
    print(
        f"API-key decision time: {args.keys} stored keys, lookup prefix {_PREFIX} hex chars, "
        f"{args.iterations} timed calls per class, Python {sys.version.split()[0]}"
    )
    titles = {
        "lookup": "Authenticator.lookup: the decision (hash, candidates, constant-time comparisons)",
        "identify": "Authenticator.identify: headers + the decision + the 401 raised when it fails",
    }
    for decider, title in titles.items():
        samples = measure(classes, decider, args.iterations, args.seed)
        print()
        print(report(samples, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
