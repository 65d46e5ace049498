"""Wire codec: tensors as packed little-endian bytes with dtype and shape (never pickled)."""

from __future__ import annotations

import math
import sys

import torch

from splitspec.errors import InvalidArgument
from splitspec.v1 import common_pb2

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}


def encode_tensor(tensor: torch.Tensor) -> common_pb2.Tensor:
    if tensor.dtype not in _NAMES:
        raise TypeError(f"cannot send dtype {tensor.dtype} on the wire")
    contiguous = tensor.detach().to("cpu").contiguous()
    raw = contiguous.view(torch.uint8) if contiguous.numel() else torch.empty(0, dtype=torch.uint8)
    data = raw.numpy().tobytes()
    if sys.byteorder != "little":
        raise RuntimeError("splitspec's wire format is little-endian; big-endian hosts are unsupported")
    return common_pb2.Tensor(dtype=_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def decode_tensor(message: common_pb2.Tensor, field: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Decode and check a tensor; errors name `field`. Returns a float32 tensor."""
    dtype = WIRE_DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidArgument(field, f"unsupported dtype {message.dtype!r} (use one of {sorted(WIRE_DTYPES)})")
    got_shape = tuple(int(d) for d in message.shape)
    if shape is not None and got_shape != shape:
        raise InvalidArgument(field, f"shape {list(got_shape)} does not match the expected {list(shape)}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected_bytes = math.prod(got_shape) * itemsize
    if len(message.data) != expected_bytes:
        raise InvalidArgument(field, f"holds {len(message.data)} bytes, shape {list(got_shape)} needs {expected_bytes}")
    if expected_bytes == 0:
        return torch.zeros(got_shape, dtype=torch.float32)
    tensor = torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(got_shape)
    return tensor.float()


def encode_sparse(probs: torch.Tensor) -> common_pb2.SparseProbs:
    """probs: [rows, vocab] -> only the non-zero entries, values bit-exact (float32)."""
    probs = probs.detach().to("cpu", torch.float32)
    mask = probs > 0
    counts = mask.sum(dim=-1)
    offsets = torch.zeros(probs.shape[0] + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0)
    indices = mask.nonzero()[:, 1].to(torch.int32)
    return common_pb2.SparseProbs(
        vocab_size=probs.shape[-1],
        offsets=offsets.numpy().tobytes(),
        indices=indices.numpy().tobytes(),
        values=probs[mask].contiguous().numpy().tobytes(),
    )


def sparse_is_smaller(probs: torch.Tensor) -> bool:
    """8 bytes per non-zero (+4 per row) against 4 bytes per entry dense."""
    return int((probs > 0).sum()) * 8 + 4 * (probs.shape[0] + 1) < probs.numel() * 4


def decode_sparse(message: common_pb2.SparseProbs, field: str, shape: tuple[int, int]) -> torch.Tensor:
    """Back to a dense float32 [rows, vocab] tensor; errors name `field`."""
    rows, vocab = shape
    if message.vocab_size != vocab:
        raise InvalidArgument(field, f"vocab_size {message.vocab_size} does not match the expected {vocab}")
    if len(message.offsets) != 4 * (rows + 1) or len(message.indices) != len(message.values):
        raise InvalidArgument(field, f"malformed sparse rows (expected {rows} rows)")
    offsets = torch.frombuffer(bytearray(message.offsets), dtype=torch.int32).long()
    count = len(message.indices) // 4
    if offsets[0] != 0 or offsets[-1] != count or bool((offsets[1:] < offsets[:-1]).any()):
        raise InvalidArgument(field, "offsets are not a valid row partition")
    dense = torch.zeros(rows, vocab, dtype=torch.float32)
    if count:
        indices = torch.frombuffer(bytearray(message.indices), dtype=torch.int32).long()
        if bool((indices < 0).any()) or bool((indices >= vocab).any()):
            raise InvalidArgument(field, f"indices outside the vocabulary [0, {vocab})")
        values = torch.frombuffer(bytearray(message.values), dtype=torch.float32)
        row_ids = torch.repeat_interleave(torch.arange(rows), offsets[1:] - offsets[:-1])
        dense[row_ids, indices] = values
    return dense


ROW_SUM_TOLERANCE = 1e-2  # a float16 / bfloat16 row of a real distribution sums to 1 within this


def check_proposal_probs(probs: torch.Tensor, token_ids: list[int], field: str) -> torch.Tensor:
    """`probs` [k, vocab] must be the distributions the proposal was sampled from: finite, >= 0,
    rows summing to 1, and each proposed token possible under its row. Anything else would make
    rejection sampling lossy (or NaN), so it is refused naming `field`. Returns `probs`."""
    if not bool(torch.isfinite(probs).all()):
        raise InvalidArgument(field, "holds NaN or infinite values")
    if bool((probs < 0).any()):
        raise InvalidArgument(field, "holds negative probabilities")
    sums = probs.sum(dim=-1)
    off = (sums - 1).abs() > ROW_SUM_TOLERANCE
    if bool(off.any()):
        row = int(off.nonzero()[0])
        raise InvalidArgument(field, f"row {row} sums to {float(sums[row]):.6g}, not 1")
    chosen = probs.gather(-1, torch.as_tensor(token_ids, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
    if bool((chosen <= 0).any()):
        row = int((chosen <= 0).nonzero()[0])
        raise InvalidArgument(field, f"row {row} gives its proposed token {token_ids[row]} probability 0")
    return probs

