"""A chat request through the gateway with a tokenizer that carries a chat template (Qwen2-style
ChatML, built locally: the byte tokenizer plus <|im_start|> and <|im_end|>) is prompted exactly
as `tokenizer.apply_chat_template` renders it, and <|im_end|> is never streamed as text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from splitspec.models import load_model
from tests.gateway.conftest import MODEL, start_gateway, stop_gateway
from tests.gateway.test_openai_api import client, coordinator_tokens
from tests.support import save_tiny_llama, start_stack

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
async def chat_web(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatml")
    target_dir = save_tiny_llama(root / "target", seed=11, vocab_size=264)  # 261 tokens, padded to 264 rows
    draft_dir = save_tiny_llama(root / "draft", seed=12, base=target_dir, noise=0.3, vocab_size=264)
    for directory in (target_dir, draft_dir):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
        tokenizer.save_pretrained(directory)
    target = load_model(str(target_dir), "cpu", "float32")
    stack = await start_stack(target, load_model(str(draft_dir), "cpu", "float32"), k=4)
    server, task, url = await start_gateway(stack.coordinator.address, target.tokenizer)
    yield stack, url, target.tokenizer
    await stop_gateway(server, task)
    await stack.stop()


def template_ids(tokenizer, messages) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}],
], ids=["default-system", "conversation"])
async def test_chat_is_prompted_exactly_as_apply_chat_template_renders_it(chat_web, messages):
    stack, url, tokenizer = chat_web
    prompt_ids = template_ids(tokenizer, messages)
    assert prompt_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == len(messages) + 1 + (
        messages[0]["role"] != "system")
    expected = await coordinator_tokens(stack, prompt_token_ids=prompt_ids, max_tokens=24, temperature=0.0,
                                        ignore_eos=True)
    reply = await client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                      extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.choices[0].message.content == expected["text"]
    assert "<|im_end|>" not in reply.choices[0].message.content
