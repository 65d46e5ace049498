"""TextStream: streamed text equals the one-shot `decode` for any token sequence (byte-fallback
and partial-UTF-8 tokens included, where invalid UTF-8 becomes U+FFFD), stop strings are cut
across token boundaries and never streamed, and SentencePiece leading spaces survive."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.detokenizer import TextStream
from tests.support import byte_level_bpe_tokenizer, sentencepiece_tokenizer

PROMPTS = ["Tom and Lily went to the park", "Once upon a time", "Lily"]  # each ends in a whole piece


class SlowTokenizer:
    """The same tokenizer without its Rust backend: TextStream's `tokenizer.decode` path."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    @property
    def all_special_ids(self) -> list[int]:
        return self._tokenizer.all_special_ids

    def __len__(self) -> int:
        return len(self._tokenizer)

    def decode(self, *args, **kwargs) -> str:
        return self._tokenizer.decode(*args, **kwargs)

    def convert_ids_to_tokens(self, *args, **kwargs):
        return self._tokenizer.convert_ids_to_tokens(*args, **kwargs)

    def convert_tokens_to_ids(self, *args, **kwargs):
        return self._tokenizer.convert_tokens_to_ids(*args, **kwargs)


_BUILT: dict[str, object] = {}


def built(kind: str):
    if kind not in _BUILT:
        _BUILT[kind] = {"sentencepiece": sentencepiece_tokenizer, "byte-level": byte_level_bpe_tokenizer}[kind]()
    return _BUILT[kind]


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level", "sentencepiece-slow"])
def tokenizer(request):
    fast = built(request.param.removesuffix("-slow"))
    return SlowTokenizer(fast) if request.param.endswith("-slow") else fast


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        stream.add(token)
        deltas.append(stream.delta(final=False))
    deltas.append(stream.delta(final=True))
    return deltas


def one_shot(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What the generated ids add to the prompt's text, by `tokenizer.decode`."""
    def decode(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    prompt_text, full = decode(prompt_ids), decode(prompt_ids + ids)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


def token_ids(tokenizer):
    """Random ids over the whole vocabulary, with byte tokens (`<0xNN>` or single bytes) often."""
    size = len(tokenizer)
    byte_ids = [i for i in range(size) if tokenizer.convert_ids_to_tokens(i).startswith("<0x")] or list(range(size))
    return st.lists(st.one_of(st.integers(0, size - 1), st.sampled_from(byte_ids)), max_size=24)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def draw_case(tokenizer, data) -> tuple[list[int], list[int]]:
    """A prompt's ids and random generated ids."""
    return tokenizer(data.draw(st.sampled_from(PROMPTS))).input_ids, data.draw(token_ids(tokenizer))


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
@PROPERTY
@given(data=st.data())
def test_streamed_text_equals_one_shot_decode_for_any_tokens(kind, data):
    tokenizer = built(kind)
    prompt_ids, ids = draw_case(tokenizer, data)
    stream = TextStream(tokenizer, prompt_ids)
    assert "".join(feed(stream, ids)) == stream.text == one_shot(tokenizer, prompt_ids, ids)


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
@PROPERTY
@given(data=st.data())
def test_stop_strings_cut_at_their_first_match_across_tokens(kind, data):
    tokenizer = built(kind)
    prompt_ids, ids = draw_case(tokenizer, data)
    expected = one_shot(tokenizer, prompt_ids, ids)
    if not expected:
        return
    start = data.draw(st.integers(0, len(expected) - 1))
    stop = expected[start : start + data.draw(st.integers(1, 4))]
    stream = TextStream(tokenizer, prompt_ids, stop=[stop])
    streamed = ""
    for token in ids:
        if stream.add(token):
            break
        streamed += stream.delta(final=False)
        assert stop not in streamed
    streamed += stream.delta(final=True)
    assert stream.stopped and streamed == expected[: expected.find(stop)]


def test_invalid_utf8_from_byte_fallback_becomes_replacement_characters(real):
    """The reproducer of issue 16 on the TinyStories tokenizer: `tokenizers`' DecodeStream raised
    "Invalid prefix encountered" here; a request must get U+FFFD as `decode` gives instead."""
    tokenizer = real["target"].tokenizer
    prompt_ids = tokenizer("Tom and Lily went to the park").input_ids
    ids = tokenizer.convert_tokens_to_ids(["$", "<0x42>", "<0xB9>", "<0x88>", "ed"])
    stream = TextStream(tokenizer, prompt_ids)
    text = "".join(feed(stream, ids))
    assert text == one_shot(tokenizer, prompt_ids, ids) == "$\ufffd\ufffd\ufffded"  # "$" has no leading "▁"


@PROPERTY
@given(data=st.data())
def test_tinystories_tokenizer_streams_any_tokens_like_decode(real, data):
    tokenizer = real["target"].tokenizer
    prompt_ids, ids = draw_case(tokenizer, data)
    assert "".join(feed(TextStream(tokenizer, prompt_ids), ids)) == one_shot(tokenizer, prompt_ids, ids)


def test_incremental_text_equals_full_decode_even_across_multibyte_characters(tokenizer):
    prompt = tokenizer("x").input_ids
    ids = tokenizer("héllo wörld ✓ done 日本", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, prompt)
    deltas = feed(stream, ids)
    assert "".join(deltas).strip() == "héllo wörld ✓ done 日本"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer("one two STOP three", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, tokenizer("x").input_ids, stop=["STOP"])
    streamed = ""
    for token in ids:
        if stream.add(token):
            break
        streamed += stream.delta(final=False)
        assert "S" not in streamed[len(" one two ") :]  # a possible stop prefix is held back
    streamed += stream.delta(final=True)
    assert stream.stopped and streamed.strip() == "one two"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer("abc def ghi", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, tokenizer("x").input_ids, stop=["ghi", "c d"])
    for token in ids:
        if stream.add(token):
            break
    assert stream.text.strip() == "ab"


@pytest.mark.parametrize("fast", [True, False], ids=["backend", "decode"])
def test_sentencepiece_leading_space_survives(real, fast):
    tokenizer = real["target"].tokenizer if fast else SlowTokenizer(real["target"].tokenizer)
    prompt = tokenizer("Once upon a time").input_ids
    ids = tokenizer("Once upon a time there was a cat").input_ids[len(prompt):]
    stream = TextStream(tokenizer, prompt)
    assert "".join(feed(stream, ids)) == " there was a cat"
