from __future__ import annotations

import pytest

from coordinator.detokenizer import TextStream


class SlowTokenizer:
    """The same tokenizer without its Rust backend: TextStream's decode-twice path."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self._tokenizer.decode(*args, **kwargs)


@pytest.fixture(scope="module", params=["decode-stream", "decode-twice"])
def tokenizer(tiny, request):
    fast = tiny["target"].tokenizer
    assert fast.backend_tokenizer is not None
    return fast if request.param == "decode-stream" else SlowTokenizer(fast)


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        stream.add(token)
        deltas.append(stream.delta(final=False))
    deltas.append(stream.delta(final=True))
    return deltas


def test_incremental_text_equals_full_decode_even_across_multibyte_characters(tokenizer):
    prompt = tokenizer("x").input_ids
    ids = tokenizer("héllo wörld ✓ done", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, prompt)
    deltas = feed(stream, ids)
    assert "".join(deltas) == "héllo wörld ✓ done"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer("one two STOP three", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, [1], stop=["STOP"])
    streamed = ""
    for token in ids:
        if stream.add(token):
            break
        streamed += stream.delta(final=False)
        assert "S" not in streamed[len("one two ") :]  # a possible stop prefix is held back
    streamed += stream.delta(final=True)
    assert stream.stopped and streamed == "one two "


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer("abc def ghi", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, [1], stop=["ghi", "c d"])
    for token in ids:
        if stream.add(token):
            break
    assert stream.text == "ab"


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "decode-twice"])
def test_sentencepiece_leading_space_survives(real, fast):
    tokenizer = real["target"].tokenizer if fast else SlowTokenizer(real["target"].tokenizer)
    prompt = tokenizer("Once upon a time").input_ids
    ids = tokenizer("Once upon a time there was a cat").input_ids[len(prompt):]
    stream = TextStream(tokenizer, prompt)
    assert "".join(feed(stream, ids)) == " there was a cat"
