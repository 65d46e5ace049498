"""Logits processing and token sampling: the one implementation both workers use.

Order (vLLM's): logit bias, then the penalties (repetition over prompt and output, as Hugging
Face's; presence and frequency over the output, as OpenAI's), the grammar mask of a structured
output (`splitspec.constraints`), the min-tokens mask (where it leaves a token the grammar allows),
then temperature, top-k, top-p, min-p. The result is the *processed* distribution p (target) or q
(draft) that rejection sampling compares. Temperature 0 means greedy: the processed distribution
is one-hot at the argmax of the biased and penalised logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from splitspec.constraints import KINDS, ConstraintSpec
from splitspec.errors import InvalidArgument, check_token_ids
from splitspec.limits import MAX_LOGPROBS

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0    # [-2, 2]: subtracted once from every token the output holds
    frequency_penalty: float = 0.0   # [-2, 2]: subtracted once per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, [-100, 100]) added to the raw logits
    min_tokens: int = 0              # output tokens before any of min_tokens_banned may be sampled
    min_tokens_banned: tuple[int, ...] = ()  # EOS and stop_token_ids, set by the coordinator
    num_prompt_tokens: int = 0       # where the output starts in a sequence's tokens
    num_logprobs: int | None = None  # None: no logprobs; n: each token's and the n most likely (`token_logprobs`)
    constraint: ConstraintSpec | None = None  # structured output: the grammar every output token must follow

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_context(self) -> bool:
        """Whether processing depends on the tokens so far (`logits_context`)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or (self.min_tokens > 0 and bool(self.min_tokens_banned)))

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raises InvalidArgument naming the first bad field; token ids are checked against
        `vocab_size` when given."""
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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # NaN fails too
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")
        for token, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise InvalidArgument(f"logit_bias.{token}", f"must be in [-100, 100], got {bias}")
        if self.min_tokens < 0:
            raise InvalidArgument("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_LOGPROBS:
            raise InvalidArgument("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.num_logprobs}")
        if self.constraint is not None and self.constraint.kind not in KINDS:
            raise InvalidArgument("constraint", f"kind must be one of {KINDS}, got {self.constraint.kind!r}")
        if self.num_prompt_tokens < 0:
            raise InvalidArgument("num_prompt_tokens", f"must be >= 0, got {self.num_prompt_tokens}")
        if vocab_size is not None:
            check_token_ids("logit_bias", [t for t, _ in self.logit_bias], vocab_size)
            check_token_ids("min_tokens_banned", self.min_tokens_banned, vocab_size)
            if self.min_tokens and len(set(self.min_tokens_banned)) >= vocab_size:
                raise InvalidArgument("min_tokens_banned", "would mask every token of the vocabulary")
        return self


@dataclass(slots=True)
class LogitsContext:
    """What the context-dependent processors need at each scored row (row i: the tokens so far
    plus proposal[:i]).

    seen:          [rows, vocab] bool     tokens in prompt or output (repetition penalty)
    output_counts: [rows, vocab] float32  occurrences in the output (presence, frequency)
    num_output:    [rows] long            output tokens (min_tokens)
    """

    seen: torch.Tensor
    output_counts: torch.Tensor
    num_output: torch.Tensor

    def append(self, token: int) -> None:
        """Every row has one more output token (a draft going on to its next position)."""
        self.seen[:, token] = True
        self.output_counts[:, token] += 1
        self.num_output += 1


def logits_context(
    params: SamplingParams, history: Sequence[int], proposal: Sequence[int], vocab_size: int
) -> LogitsContext | None:
    """The context of each scored position, or None when `params` needs none (nothing to compute).
    `history` is the sequence so far, prompt first (its first `params.num_prompt_tokens` tokens)."""
    if not params.needs_context:
        return None
    rows = len(proposal) + 1
    seen = torch.zeros(rows, vocab_size, dtype=torch.bool)
    if history:
        seen[:, torch.as_tensor(list(history), dtype=torch.long)] = True
    output = list(history[params.num_prompt_tokens:])
    counts = torch.zeros(rows, vocab_size)
    if output:
        counts += torch.bincount(torch.as_tensor(output, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    for i, token in enumerate(proposal):
        seen[i + 1 :, token] = True
        counts[i + 1 :, token] += 1
    return LogitsContext(seen, counts, len(output) + torch.arange(rows))


def process_logits(
    logits: torch.Tensor, params: SamplingParams, context: LogitsContext | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn raw logits into the processed sampling distribution.

    logits:  [n, vocab] (any float dtype; computed in float32)
    context: the n rows' `logits_context` (None: the penalties and min_tokens do not apply)
    allowed: [n, vocab] bool, the grammar's tokens at each row (None: unconstrained)
    returns probs: [n, vocab] float32, rows sum to 1 (one-hot rows when greedy)
    """
    logits = logits.float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        logits = logits.index_add(-1, ids, torch.tensor([b for _, b in params.logit_bias]).expand(len(logits), -1))
    if context is not None:
        logits = _penalize(logits, params, context)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    if context is not None:
        logits = _mask_early_stops(logits, params, context)
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


def _penalize(logits: torch.Tensor, params: SamplingParams, context: LogitsContext) -> torch.Tensor:
    """logits: [n, vocab] float32 -> the same, penalised and min-tokens masked."""
    if params.repetition_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(context.seen, penalized, logits)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = context.output_counts
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits.clamp(-_FLOAT32_MAX, _FLOAT32_MAX)  # an extreme penalty moves a logit as far as it goes, never to inf


def _mask_early_stops(logits: torch.Tensor, params: SamplingParams, context: LogitsContext) -> torch.Tensor:
    """Before min_tokens output tokens, mask EOS and the stop tokens, in the rows where that leaves a
    token (a finished grammar allows only EOS: the grammar wins)."""
    if params.min_tokens == 0 or not params.min_tokens_banned:
        return logits
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
    banned[list(params.min_tokens_banned)] = True
    masked = logits.masked_fill(banned, -math.inf)
    apply = (context.num_output < params.min_tokens) & torch.isfinite(masked).any(dim=-1)
    return torch.where(apply.unsqueeze(-1), masked, logits)


@dataclass(slots=True, frozen=True)
class TokenLogprobs:
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprobs]:
    """The model's raw log-softmax (before bias, penalties and temperature: vLLM's default) at each
    row: the emitted token's logprob and the `top` most likely tokens there.

    logits: [n, vocab] raw; tokens: n token ids, one per row
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, torch.as_tensor(list(tokens), dtype=torch.long).unsqueeze(-1)).squeeze(-1)
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return [TokenLogprobs(float(chosen[row]), tuple(zip(ids[row].tolist(), values[row].tolist())))
            for row in range(len(tokens))]


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
