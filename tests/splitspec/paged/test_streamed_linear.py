"""The streamed linear kernel against a float64 matmul: row counts across its register tiles
(one row, a partial tile, whole tiles, several tiles), output widths that do not fill a panel,
odd inner sizes, a bias, leading batch dimensions, and inside a compiled graph; bad inputs raise."""

from __future__ import annotations

import pytest
import torch

from splitspec.paged.kernels import cpu_streamed_linear, pack_streamed_weight, parallel_threads, streamed_linear
from splitspec.paged.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(not cpu_streamed_linear(),
                                reason="the streamed linear kernel does not build here (no C++ compiler or no AVX2)")


def expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double() @ weight.double().T
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 25, 40])
@pytest.mark.parametrize("out_features, in_features", [(32, 64), (33, 7), (100, 130), (1, 16), (600, 512)])
def test_matches_a_matmul(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    out = streamed_linear(x, pack_streamed_weight(weight), None, out_features)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    assert (out.double() - expected(x, weight, None)).abs().max() < 1e-3 * in_features ** 0.5


def test_bias_and_leading_dimensions():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 48, generator=generator)[:, ::2]  # [2, 5, 48], not contiguous
    weight, bias = torch.randn(70, 48, generator=generator), torch.randn(70, generator=generator)
    out = streamed_linear(x, pack_streamed_weight(weight), bias, 70)
    assert out.shape == (2, 5, 70)
    assert (out.double() - expected(x, weight, bias)).abs().max() < 1e-4


def test_packing_pads_the_last_panel_with_zero_columns():
    weight = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    packed = pack_streamed_weight(weight)
    panel = packed.shape[2]
    assert packed.shape == (1, 5, panel) and panel in (16, 32)  # two AVX2 or AVX-512 registers
    assert torch.equal(packed[0, :, :3], weight.T) and not packed[0, :, 3:].any()


def test_panels_split_over_torchs_threads():
    """Built with OpenMP, so at::parallel_for uses every torch thread (without it the kernel ran on
    one thread whatever torch.set_num_threads said); panels are independent, so the result is the
    same bit for bit."""
    generator = torch.Generator().manual_seed(2)
    x, weight = torch.randn(5, 96, generator=generator), torch.randn(300, 96, generator=generator)
    packed, previous = pack_streamed_weight(weight), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = streamed_linear(x, packed, None, 300)
        torch.set_num_threads(2)
        assert parallel_threads("streamed_linear") == 2
        assert torch.equal(streamed_linear(x, packed, None, 300), alone)
    finally:
        torch.set_num_threads(previous)


def test_bad_inputs_raise():
    packed = pack_streamed_weight(torch.randn(40, 8))
    with pytest.raises(RuntimeError, match="float32"):
        streamed_linear(torch.randn(2, 8, dtype=torch.float64), packed, None, 40)
    with pytest.raises(RuntimeError, match="does not match"):
        streamed_linear(torch.randn(2, 9), packed, None, 40)
    with pytest.raises(RuntimeError, match="does not match"):
        streamed_linear(torch.randn(2, 8), packed, None, 90)
    with pytest.raises(RuntimeError, match="pack_streamed_weight"):
        streamed_linear(torch.randn(2, 8), torch.randn(40, 8), None, 40)


def test_packed_linear_calls_it_in_compiled_graphs_and_onednn_eagerly():
    linear = torch.nn.Linear(64, 96, bias=True)
    module = PackedLinear(linear, keep_dense=True, streamed=True)
    assert module.weight is None and module.streamed is not None  # no dense copy beside the two packings
    x = torch.randn(3, 64)
    reference = linear(x).detach()
    compiled = torch.compile(module, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        assert (compiled(x) - reference).abs().max() < 1e-4
        assert (module(x) - reference).abs().max() < 1e-4
    graph = torch._dynamo.explain(module)(x).graphs[0]
    assert any("streamed_linear" in str(node.target) for node in graph.graph.nodes)
