"""Logits processing and token sampling: the one implementation both workers use.

Order matches Hugging Face `generate`: repetition penalty, then temperature, top-k, top-p, min-p.
The result is the *processed* distribution p (target) or q (draft) that rejection sampling compares.
Temperature 0 means greedy: the processed distribution is one-hot at the argmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from splitspec.errors import InvalidArgument

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        """Raises InvalidArgument naming the first bad field."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(
                "repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty}"
            )
        if not 0 <= self.seed < 2**64:
            raise InvalidArgument("seed", f"must be in [0, 2**64), got {self.seed}")
        return self


def seen_tokens(history: Sequence[int], proposal: Sequence[int], vocab_size: int) -> torch.Tensor:
    """Which tokens each scored position has seen, for the repetition penalty.

    Returns seen: [len(proposal) + 1, vocab] bool; row i covers history + proposal[:i].
    """
    rows = len(proposal) + 1
    seen = torch.zeros(rows, vocab_size, dtype=torch.bool)
    if history:
        seen[:, torch.as_tensor(list(history), dtype=torch.long)] = True
    for i, token in enumerate(proposal):
        seen[i + 1 :, token] = True
    return seen


def penalty_context(
    params: SamplingParams, history: Sequence[int], proposal: Sequence[int], vocab_size: int
) -> torch.Tensor | None:
    """`seen_tokens` when the request has a repetition penalty, else None (nothing to compute)."""
    if params.repetition_penalty == 1.0:
        return None
    return seen_tokens(history, proposal, vocab_size)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Turn raw logits into the processed sampling distribution.

    logits: [n, vocab] (any float dtype; computed in float32)
    seen:   [n, vocab] bool, tokens already in each row's context (repetition penalty)
    returns probs: [n, vocab] float32, rows sum to 1 (one-hot rows when greedy)
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        ).clamp(-_FLOAT32_MAX, _FLOAT32_MAX)  # an extreme penalty moves a logit as far as it goes, never to inf
        logits = torch.where(seen, penalized, logits)
    peak = logits.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(peak).all()):
        raise InvalidArgument("logits", "a row has no finite logit: every token is masked (or the model gave NaN)")
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    # Shifted so the top logit is 0 before the division: the same softmax, and at a temperature
    # near 0 (even subnormal) the limit, one-hot at the argmax, instead of inf - inf = NaN.
    logits = (logits - peak) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - params.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    if params.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, -math.inf)
    return logits.softmax(dim=-1)


def check_confidence(name: str, value: float) -> None:
    """A draft-confidence threshold must be in [0, 1] (0: always k tokens); the error names `name`."""
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise InvalidArgument(name, f"must be in [0, 1] (0 = always k tokens), got {value}")


def token_confidence(logits: torch.Tensor, probs: torch.Tensor, token: int, params: SamplingParams) -> float:
    """The probability the drafting distribution gave `token`: q(token), or, for greedy (q is
    one-hot), the softmax of the logits at it, as transformers' assistant_confidence_threshold.

    logits: [vocab] raw; probs: [vocab] processed (`process_logits`)
    """
    if params.greedy:
        return float(logits.float().softmax(dim=-1)[token])
    return float(probs[token])


def make_generator(seed: int, stream: int) -> torch.Generator:
    """A per-request generator; `stream` separates the draft's and the target's random streams."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 0x9E3779B97F4A7C15 + stream) % 2**63)
    return generator


def draw_exponentials(vocab_size: int, greedy: bool, generator: torch.Generator) -> torch.Tensor:
    """Exp(1) noise for one categorical draw; ones for greedy (no randomness consumed)."""
    if greedy:
        return torch.ones(vocab_size)
    return torch.empty(vocab_size).exponential_(generator=generator)


def draw_uniforms(count: int, greedy: bool, generator: torch.Generator) -> torch.Tensor:
    """U[0, 1) acceptance draws; zeros for greedy, where p and q are one-hot."""
    if greedy:
        return torch.zeros(count)
    return torch.rand(count, generator=generator)


def sample(probs: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """Categorical sampling by exponential race: argmax(p / E), E ~ Exp(1), picks i with prob p_i.

    probs: [..., vocab]; exponentials: [..., vocab] (ones give argmax); returns [...] long
    """
    return (probs / exponentials).argmax(dim=-1)
