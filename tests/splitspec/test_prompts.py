"""A text prompt's token ids: the tokenizer's, with one BOS even when the text starts with it."""

from __future__ import annotations

from splitspec.prompts import encode_prompt
from tests.support import real_model_dir


def test_a_text_that_starts_with_bos_gets_no_second_one():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model_dir() / "tinystories-260k"))
    ids = tokenizer("Once upon a time").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert encode_prompt(tokenizer, "Once upon a time") == ids
    decoded = tokenizer.decode(ids)  # "<s> Once upon a time": what lm-eval sends as text
    assert tokenizer(decoded).input_ids[:2] == [tokenizer.bos_token_id] * 2  # the tokenizer alone doubles it
    assert encode_prompt(tokenizer, decoded) == ids
    assert encode_prompt(tokenizer, decoded, add_special_tokens=False) == ids
    assert encode_prompt(tokenizer, "Once", add_special_tokens=False) == ids[1:2]


def test_other_texts_are_the_tokenizers_encoding(tiny):
    tokenizer = tiny["target"].tokenizer
    for text in ("hello world", "", " <s>hi", "hi <s>"):
        assert encode_prompt(tokenizer, text) == list(tokenizer(text).input_ids)
    bos = tokenizer.bos_token
    assert encode_prompt(tokenizer, bos + "hi") == list(tokenizer("hi").input_ids)
