from __future__ import annotations

import pytest
import torch

from splitspec.codec import check_proposal_probs, decode_tensor, encode_tensor
from splitspec.errors import InvalidArgument
from splitspec.v1 import common_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    tensor = torch.rand(3, 17).to(dtype)
    message = encode_tensor(tensor)
    assert message.dtype == str(dtype).removeprefix("torch.") and list(message.shape) == [3, 17]
    assert len(message.data) == tensor.numel() * tensor.element_size()
    assert torch.equal(decode_tensor(message, "probs"), tensor.float())


def test_probabilities_travel_as_bytes_not_repeated_float():
    field = common_pb2.Tensor.DESCRIPTOR.fields_by_name["data"]
    assert field.type == field.TYPE_BYTES


@pytest.mark.parametrize(
    "message,problem",
    [
        (common_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unsupported dtype"),
        (common_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "needs 16"),
    ],
)
def test_bad_payloads_name_the_field(message, problem):
    with pytest.raises(InvalidArgument, match=rf"^draft_probs: .*{problem}"):
        decode_tensor(message, "draft_probs")


def test_shape_mismatch_names_the_field():
    with pytest.raises(InvalidArgument, match=r"^draft_probs: shape \[2, 3\]"):
        decode_tensor(encode_tensor(torch.zeros(2, 3)), "draft_probs", (2, 4))


def test_sparse_rows_round_trip_exactly_and_are_smaller_when_truncated():
    from splitspec.codec import decode_sparse, encode_sparse, sparse_is_smaller
    from splitspec.sampling import SamplingParams, process_logits

    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(0))
    q = process_logits(logits, SamplingParams(temperature=0.8, top_k=20))
    assert sparse_is_smaller(q)
    message = encode_sparse(q)
    assert torch.equal(decode_sparse(message, "draft_sparse_probs", (4, 512)), q)  # bit-exact
    assert message.ByteSize() < encode_tensor(q).ByteSize() / 10
    full = process_logits(logits, SamplingParams(temperature=0.8))
    assert not sparse_is_smaller(full)


def test_malformed_sparse_rows_name_the_field():
    from splitspec.codec import decode_sparse, encode_sparse

    message = encode_sparse(torch.tensor([[0.5, 0.5, 0.0]]))
    with pytest.raises(InvalidArgument, match="^draft_sparse_probs: vocab_size"):
        decode_sparse(message, "draft_sparse_probs", (1, 4))
    message.indices = (7).to_bytes(4, "little") * 2
    with pytest.raises(InvalidArgument, match="^draft_sparse_probs: indices outside"):
        decode_sparse(message, "draft_sparse_probs", (1, 3))


def _proposal_q() -> torch.Tensor:
    return torch.softmax(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), dim=-1)


@pytest.mark.parametrize("break_it,problem", [
    (lambda q: q.index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(float("nan"))), "NaN"),
    (lambda q: q.index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(float("inf"))), "NaN or infinite"),
    (lambda q: q.sub_(0.2), "negative"),
    (lambda q: q.mul_(1.5), "sums to"),
    (lambda q: q.zero_(), "sums to"),
    (lambda q: q.copy_(torch.eye(8)[[5, 5]]), "probability 0"),  # the proposed tokens are 1 and 2
])
def test_proposal_probs_that_are_no_distribution_are_refused(break_it, problem):
    q = _proposal_q()
    assert check_proposal_probs(q, [1, 2], "draft_probs") is q
    with pytest.raises(InvalidArgument) as info:
        check_proposal_probs(break_it(q.clone()), [1, 2], "draft_probs")
    assert info.value.field == "draft_probs" and problem in str(info.value)
