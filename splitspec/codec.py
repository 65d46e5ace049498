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
