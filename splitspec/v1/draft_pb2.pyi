from splitspec.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftRequest(_message.Message):
    __slots__ = ("seq_id", "sampling", "num_accepted", "new_token_ids", "k", "speculative", "branch_width", "held_branch", "min_confidence")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    BRANCH_WIDTH_FIELD_NUMBER: _ClassVar[int]
    HELD_BRANCH_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    sampling: _common_pb2.SamplingParams
    num_accepted: int
    new_token_ids: _containers.RepeatedScalarFieldContainer[int]
    k: int
    speculative: bool
    branch_width: int
    held_branch: int
    min_confidence: float
    def __init__(self, seq_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_accepted: _Optional[int] = ..., new_token_ids: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., speculative: _Optional[bool] = ..., branch_width: _Optional[int] = ..., held_branch: _Optional[int] = ..., min_confidence: _Optional[float] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("token_ids", "probs", "num_tokens", "step_seconds", "sparse_probs", "branches")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_PROBS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _common_pb2.Tensor
    num_tokens: int
    step_seconds: float
    sparse_probs: _common_pb2.SparseProbs
    branches: _containers.RepeatedCompositeFieldContainer[DraftBranch]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_tokens: _Optional[int] = ..., step_seconds: _Optional[float] = ..., sparse_probs: _Optional[_Union[_common_pb2.SparseProbs, _Mapping]] = ..., branches: _Optional[_Iterable[_Union[DraftBranch, _Mapping]]] = ...) -> None: ...

class DraftBranch(_message.Message):
    __slots__ = ("num_accepted", "token_id", "proposal")
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    num_accepted: int
    token_id: int
    proposal: DraftResponse
    def __init__(self, num_accepted: _Optional[int] = ..., token_id: _Optional[int] = ..., proposal: _Optional[_Union[DraftResponse, _Mapping]] = ...) -> None: ...
