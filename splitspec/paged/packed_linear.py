"""Linear layers on weights prepacked for oneDNN (CPU): the GEMM of every decode, verify and
prefill step.

A decode or verify step multiplies a few rows by every weight of the model once, so it is bound
by reading the weights. oneDNN's matmul on a weight reordered once into its blocked layout streams
them at close to the copy bandwidth from 1 to about 8 rows; it is ahead of ATen's kernels at every
row count measured and of inductor's C++ templates from about 6 rows on (the README's GEMM and
forward-cost tables; `benchmarks/forward_cost.py`). vLLM's CPU
backend prepacks its linears the same way. The CPU's compiled graphs (steps of up to a few
tokens) keep the dense weights, for inductor's GEMM templates; every longer step runs eagerly on
the packed ones. A model whose weights stream from memory each step may instead take the
streamed linear (`streamed_linear.cpp`, `PagedRunner`) in its graphs, on weights packed for it.
"""

from __future__ import annotations

from typing import Any

import torch

from splitspec.paged.kernels import pack_streamed_weight, streamed_linear

PACK_ROWS = 16  # the row count oneDNN picks its blocked layout for (measured: 16, 32 and 64 equal)
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [..., in_features], packed: a oneDNN-layout weight [out_features, in_features]
    -> [..., out_features]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Module):
    """`torch.nn.Linear` computed by `packed_linear`. With `keep_dense`, it also keeps the dense
    weight for compiled graphs (steps of a few rows), where inductor's C++ GEMM templates, fused
    with what surrounds them, beat oneDNN (6.8 against 8.7 ms for one token on the pair's target);
    eagerly, on the longer steps, the packed weight serves. With `streamed`, compiled graphs call
    the streamed linear kernel on its own packing of the weight instead (no dense weight kept)."""

    def __init__(self, linear: torch.nn.Linear, keep_dense: bool = False, streamed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.register_buffer("weight", weight if keep_dense and not streamed else None, persistent=False)
        self.register_buffer("streamed", pack_streamed_weight(weight) if streamed else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if self.streamed is not None:
                return streamed_linear(x, self.streamed, self.bias, self.out_features)
            if self.weight is not None:
                return torch.nn.functional.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: Any) -> bool:
    """Whether `model`'s linears can run on packed weights: on the CPU, float32 or bfloat16, with
    oneDNN in this torch build, and for bfloat16 a CPU whose oneDNN has a bfloat16 path (AVX-512
    BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU the reorder raises, and the linears stay plain)."""
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype in PACKED_DTYPES
            and torch.backends.mkldnn.is_available()
            and (parameter.dtype != torch.bfloat16 or bfloat16_packs()))


def bfloat16_packs() -> bool:
    """Whether this CPU's oneDNN packs bfloat16 weights."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: torch.nn.Module, keep_dense: bool = False, streamed: bool = False) -> int:
    """Replace, in place, every `torch.nn.Linear` of `model` with a `PackedLinear`, except those
    with hooks (a tensor-parallel all-reduce or gather runs as a hook). Returns how many were
    packed. Without `keep_dense`, a dense weight is freed unless an embedding shares it.
    `streamed`: float32 only, and `kernels.cpu_streamed_linear()` must hold."""
    replacements = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and not (child._forward_hooks or child._forward_pre_hooks)
    ]
    for parent, name, child in replacements:
        setattr(parent, name, PackedLinear(child, keep_dense, streamed))
    return len(replacements)
