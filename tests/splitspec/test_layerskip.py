"""Layer skipping: the skipped model is exactly the smaller model made of the kept layers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from splitspec.errors import InvalidArgument
from splitspec.layerskip import layers_skipped, parse_skip_layers, read_skip_file, skip_layers
from splitspec.models import load_model


def _three_layer_model(tmp_path):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _kept_layers_model(model, keep: list[int]):
    """A fresh model with len(keep) layers whose weights are the kept layers' (renumbered)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": len(keep)})
    small = LlamaForCausalLM(config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) in keep:
                state[f"model.layers.{keep.index(int(index))}.{rest}"] = tensor
        else:
            state[name] = tensor
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("skip", [[0], [1], [2], [0, 2]])
def test_skipped_model_equals_the_model_of_its_kept_layers(tmp_path, skip):
    model = _three_layer_model(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    full = model(ids).logits
    expected = _kept_layers_model(model, [i for i in range(3) if i not in skip])(ids).logits
    with torch.inference_mode(), layers_skipped(model, skip) as skipped:
        got = skipped(ids).logits
        assert skipped.config.num_hidden_layers == 3 - len(skip)
        assert [layer.self_attn.layer_idx for layer in skipped.model.layers] == list(range(3 - len(skip)))
        # with a KV cache too: the cache holds one entry per kept layer
        generated = skipped.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, full)
    reference = _kept_layers_model(model, [i for i in range(3) if i not in skip]).generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.tolist() == reference.tolist()
    torch.testing.assert_close(model(ids).logits, full)  # whole again after the block
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_skip_layers_in_place_on_a_loaded_model(tiny_dirs):
    loaded = load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32")
    skip_layers(loaded.model, [0])
    assert len(loaded.model.model.layers) == 1 and loaded.model.config.num_hidden_layers == 1


def test_bad_skip_sets_name_the_flag(tmp_path):
    model = _three_layer_model(tmp_path)
    with pytest.raises(InvalidArgument, match=r"--skip-layers: layers \[3\] do not exist"):
        skip_layers(model, [3])
    with pytest.raises(InvalidArgument, match="--skip-layers: skipping all 3 layers"):
        skip_layers(model, [0, 1, 2])
    with pytest.raises(InvalidArgument, match="--skip-layers: expected comma-separated"):
        parse_skip_layers("1,x")
    assert len(model.model.layers) == 3


def test_parse_and_read_skip_sets(tmp_path):
    assert parse_skip_layers("5,1,2-3") == [1, 2, 3, 5]
    good = tmp_path / "best.json"
    good.write_text(json.dumps({"skip_layers": [3, 1], "acceptance": 0.6}))
    assert read_skip_file(str(good)) == [1, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"skip_layers": "1,3"}))
    with pytest.raises(InvalidArgument, match="--skip-layers-file"):
        read_skip_file(str(bad))
    with pytest.raises(InvalidArgument, match="--skip-layers-file"):
        read_skip_file(str(tmp_path / "missing.json"))
