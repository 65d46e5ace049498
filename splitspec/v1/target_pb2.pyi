from splitspec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("seq_id", "token_ids", "sampling", "max_new_tokens", "num_lookahead_slots", "resume", "num_prompt_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKAHEAD_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    num_lookahead_slots: int
    resume: bool
    num_prompt_logprobs: int
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., num_lookahead_slots: _Optional[int] = ..., resume: _Optional[bool] = ..., num_prompt_logprobs: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("token_id", "num_tokens", "num_cached_tokens", "logprobs", "prompt_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    num_tokens: int
    num_cached_tokens: int
    logprobs: _common_pb2.TokenLogprobs
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, token_id: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("seq_id", "draft_token_ids", "draft_probs", "num_tokens", "draft_sparse_probs", "branches", "autonomous_rounds", "extends_autonomy")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SPARSE_PROBS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    AUTONOMOUS_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EXTENDS_AUTONOMY_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _common_pb2.Tensor
    num_tokens: int
    draft_sparse_probs: _common_pb2.SparseProbs
    branches: _containers.RepeatedCompositeFieldContainer[VerifyBranch]
    autonomous_rounds: int
    extends_autonomy: bool
    def __init__(self, seq_id: _Optional[str] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_tokens: _Optional[int] = ..., draft_sparse_probs: _Optional[_Union[_common_pb2.SparseProbs, _Mapping]] = ..., branches: _Optional[_Iterable[_Union[VerifyBranch, _Mapping]]] = ..., autonomous_rounds: _Optional[int] = ..., extends_autonomy: _Optional[bool] = ...) -> None: ...

class VerifyBranch(_message.Message):
    __slots__ = ("num_accepted", "token_id", "next")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    token_id: int
    next: VerifyRequest
    def __init__(self, num_accepted: _Optional[int] = ..., token_id: _Optional[int] = ..., next: _Optional[_Union[VerifyRequest, _Mapping]] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("num_accepted", "token_id", "is_bonus", "acceptance_probs", "num_tokens", "preempted", "step_seconds", "chained", "logprobs")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    IS_BONUS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_PROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHAINED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    token_id: int
    is_bonus: bool
    acceptance_probs: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    preempted: bool
    step_seconds: float
    chained: bool
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, num_accepted: _Optional[int] = ..., token_id: _Optional[int] = ..., is_bonus: _Optional[bool] = ..., acceptance_probs: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ..., preempted: _Optional[bool] = ..., step_seconds: _Optional[float] = ..., chained: _Optional[bool] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
