"""Coverage-guided fuzzing of the SSE usage reader: any bytes, cut anywhere -> usage or nothing.

    .venv/bin/python fuzz/fuzz_sse.py -atheris_runs=100000 -dict=fuzz/sse.dict CORPUS_DIR

A crash is any exception from `SseUsageReader.feed` or the rollout signals, a usage that is not a
pair of non-negative integers, or an answer that depends on where the stream was cut: the bytes
the client gets and the usage read must be the same for one chunk and for the input's own cuts.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["extproc"]):
    from extproc.signals import ContentSignals
    from extproc.sse import SseUsageReader, Usage, usage_from_json_body


def _read(chunks: list[bytes], hide: bool, signals: ContentSignals | None) -> tuple[bytes, Usage | None]:
    reader = SseUsageReader(hide_usage_event=hide, signals=signals)
    out = []
    for index, chunk in enumerate(chunks):
        replacement = reader.feed(chunk, end_of_stream=index == len(chunks) - 1)
        out.append(chunk if replacement is None else replacement)
    return b"".join(out), reader.usage


def _sound(usage: Usage | None) -> None:
    if usage is not None and not all(
        type(v) is int and 0 <= v < 1 << 53 for v in (usage.prompt_tokens, usage.completion_tokens)
    ):
        raise AssertionError(f"unusable usage {usage}")


def TestOneInput(data: bytes) -> None:  # atheris calls it by this name
    fdp = atheris.FuzzedDataProvider(data)
    hide, watch, json_mode, tools = (fdp.ConsumeBool() for _ in range(4))
    cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 4096))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    chunks, start = [], 0
    for cut in cuts:
        cut = min(cut, len(stream))
        chunks.append(stream[start:cut])
        start = max(start, cut)
    chunks.append(stream[start:])

    whole_signals = ContentSignals(json_mode, tools) if watch else None
    split_signals = ContentSignals(json_mode, tools) if watch else None
    whole = _read([stream], hide, whole_signals)
    split = _read(chunks, hide, split_signals)
    if whole != split:
        raise AssertionError(f"the answer depends on the cuts {cuts}: {whole!r} != {split!r}")
    if not hide and whole[0] != stream:
        raise AssertionError("an observing reader changed the stream")
    _sound(whole[1])
    if whole_signals is not None and split_signals is not None and whole_signals.finish() != split_signals.finish():
        raise AssertionError("the rollout signals depend on the cuts")
    # The same bytes as one buffered JSON response.
    _sound(usage_from_json_body(stream, ContentSignals(json_mode, tools)))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
