"""Greedy output with OpenAI's penalties, logit bias, min_tokens and stop_token_ids is token for
token what `transformers.generate` gives for the target alone with the same processors, with and
without speculation (draft and target apply them through the one `process_logits`)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from splitspec.v1 import coordinator_pb2
from tests.support import collect, start_stack

PROMPT = "hello world"
MAX_TOKENS = 40


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's documented formula over the generated tokens only:
    mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores)
        output = input_ids[:, self.prompt_length:]
        counts.scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def reference(loaded, prompt_ids: list[int], settings: dict, stop_ids: list[int]) -> list[int]:
    """The target alone under `settings`, in splitspec's documented order: bias, penalties,
    min-tokens mask, greedy."""
    processors = LogitsProcessorList()
    if settings.get("logit_bias"):
        processors.append(SequenceBiasLogitsProcessor({(t,): b for t, b in settings["logit_bias"].items()}))
    if settings.get("repetition_penalty", 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    processors.append(OpenAIPenalties(len(prompt_ids), settings.get("presence_penalty", 0.0),
                                      settings.get("frequency_penalty", 0.0)))
    if settings.get("min_tokens"):
        processors.append(MinNewTokensLengthLogitsProcessor(len(prompt_ids), settings["min_tokens"], stop_ids))
    config = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=stop_ids or [])
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt_ids]), generation_config=config, logits_processor=processors)
    return out[0, len(prompt_ids):].tolist()


def frequent_tokens(loaded, prompt_ids: list[int]) -> list[int]:
    """The tokens plain greedy output uses most, so that the settings below change it."""
    plain = reference(loaded, prompt_ids, {}, [])
    return sorted(set(plain), key=lambda t: (-plain.count(t), t))


SETTINGS = {
    "presence": lambda common: {"presence_penalty": 1.5},
    "frequency": lambda common: {"frequency_penalty": 0.8},
    "negative": lambda common: {"presence_penalty": -1.0, "frequency_penalty": -0.5},
    "logit_bias": lambda common: {"logit_bias": {common[0]: -100.0, common[1]: 5.0}},
    "mixed": lambda common: {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.3,
                             "logit_bias": {common[2]: 3.0}},
    "stop_token_ids": lambda common: {"stop_token_ids": [common[1]]},
    "min_tokens": lambda common: {"stop_token_ids": [common[0]], "min_tokens": 12},
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
async def test_penalised_greedy_output_is_the_target_alone(tiny, name):
    target = tiny["target"]
    prompt_ids = target.tokenizer(PROMPT).input_ids
    common = frequent_tokens(target, prompt_ids)
    settings = SETTINGS[name](common)
    stop_ids = settings.get("stop_token_ids", [])
    expected = reference(target, prompt_ids, settings, stop_ids)
    plain = reference(target, prompt_ids, {}, [])
    assert expected != plain, f"{name}: the settings must change the output for the test to mean anything"
    if name == "min_tokens":  # without min_tokens the stop token ends the output earlier
        assert len(reference(target, prompt_ids, {"stop_token_ids": stop_ids}, stop_ids)) < 12 <= len(expected)
    stack = await start_stack(target, tiny["draft_noisy"], k=4, max_k=8)
    try:
        for k in (0, 1, 4):
            request = coordinator_pb2.GenerateRequest(prompt_token_ids=prompt_ids, max_tokens=MAX_TOKENS,
                                                      temperature=0.0, k=k, ignore_eos=True)
            for field in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
                if field in settings:
                    setattr(request, field, settings[field])
            request.stop_token_ids.extend(stop_ids)
            for token, bias in settings.get("logit_bias", {}).items():
                request.logit_bias[token] = bias
            result = await collect(stack.stub, request)
            assert result["token_ids"] == expected, (name, k)
            if k:
                assert result["last"].spec.draft_tokens > 0
    finally:
        await stack.stop()
