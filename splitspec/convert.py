"""Conversions between wire messages and the core's dataclasses."""

from __future__ import annotations

from splitspec.constraints import ConstraintSpec
from splitspec.sampling import SamplingParams, TokenLogprobs
from splitspec.v1 import common_pb2


def constraint_from_proto(message: common_pb2.Constraint) -> ConstraintSpec | None:
    kind = message.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not message.json_object):
        return None
    return ConstraintSpec(kind, "" if kind == "json_object" else getattr(message, kind))


def constraint_to_proto(spec: ConstraintSpec | None) -> common_pb2.Constraint | None:
    if spec is None:
        return None
    if spec.kind == "json_object":
        return common_pb2.Constraint(json_object=True)
    return common_pb2.Constraint(**{spec.kind: spec.value})


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_k=message.top_k,
        top_p=message.top_p,
        min_p=message.min_p,
        repetition_penalty=message.repetition_penalty,
        seed=message.seed,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        logit_bias=tuple(sorted(message.logit_bias.items())),
        min_tokens=message.min_tokens,
        min_tokens_banned=tuple(message.min_tokens_banned),
        num_prompt_tokens=message.num_prompt_tokens,
        num_logprobs=message.num_logprobs if message.HasField("num_logprobs") else None,
        constraint=constraint_from_proto(message.constraint),
    ).validate()


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias),
        min_tokens=params.min_tokens,
        min_tokens_banned=params.min_tokens_banned,
        num_prompt_tokens=params.num_prompt_tokens,
        num_logprobs=params.num_logprobs,
        constraint=constraint_to_proto(params.constraint),
    )


def logprobs_to_proto(entry: TokenLogprobs) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(logprob=entry.logprob, top_token_ids=[t for t, _ in entry.top],
                                    top_logprobs=[v for _, v in entry.top])
