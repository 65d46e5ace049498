"""oneDNN-packed linears compute what `torch.nn.Linear` computes, replace every plain linear of a
model except hooked ones, and give the model the same logits."""

from __future__ import annotations

import pytest
import torch

from splitspec.models import load_model
from splitspec.paged.packed_linear import PackedLinear, bfloat16_packs, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (1, 17, 48), (2, 5, 48), (300, 48)])
def test_packed_linear_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected, got = linear(x), PackedLinear(linear)(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.skipif(not bfloat16_packs(), reason="this CPU's oneDNN has no bfloat16 path (AVX-512 BW/VL/DQ or "
                                                 "AVX-NE-CONVERT); test_bfloat16_stays_plain_where_it_cannot_pack covers it")
def test_packed_linear_in_bfloat16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, got = linear(x).float(), PackedLinear(linear)(x).float()
    assert got.dtype == torch.float32 and (got - expected).abs().max().item() <= 0.05 * expected.abs().max().item()


def test_bfloat16_stays_plain_where_it_cannot_pack(tiny_dirs, monkeypatch):
    """On a CPU without oneDNN's bfloat16 path a bfloat16 model is not packed (the reorder would
    raise and stop the worker); float32 packs still."""
    import splitspec.paged.packed_linear as packed_linear

    monkeypatch.setattr(packed_linear, "bfloat16_packs", lambda: False)
    assert not can_pack(load_model(str(tiny_dirs["target"]), device="cpu", dtype="bfloat16").model)
    assert can_pack(load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32").model)
    monkeypatch.setattr(packed_linear, "bfloat16_packs", lambda: True)
    assert can_pack(load_model(str(tiny_dirs["target"]), device="cpu", dtype="bfloat16").model)


def test_pack_linears_replaces_plain_linears_and_keeps_the_logits(tiny_dirs):
    loaded = load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32")
    model = loaded.model
    assert can_pack(model)
    plain = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    hooked = model.model.layers[0].self_attn.o_proj
    hooked.register_forward_hook(lambda module, args, output: output)
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.inference_mode():
        before = model(ids).logits
    assert pack_linears(model) == len(plain) - 1
    assert model.model.layers[0].self_attn.o_proj is hooked  # a hook (tensor parallelism's all-reduce) keeps its module
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    assert len(packed) == len(plain) - 1 and all(module.weight is None for module in packed)
    with torch.inference_mode():
        after = model(ids).logits
    assert (after - before).abs().max().item() <= 1e-5
    assert pack_linears(model) == 0  # packed once


def test_keep_dense_keeps_the_weight_for_one_row_graphs(tiny_dirs):
    loaded = load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32")
    weight = loaded.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    pack_linears(loaded.model, keep_dense=True)
    kept = loaded.model.model.layers[0].mlp.down_proj
    assert isinstance(kept, PackedLinear) and torch.equal(kept.weight, weight)


def test_nothing_packs_off_the_cpu_float_types(tiny_dirs):
    loaded = load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32")
    assert not can_pack(loaded.model.to(torch.float16))
