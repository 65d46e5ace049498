from __future__ import annotations

import shutil

import pytest

from splitspec.errors import ModelLoadError
from splitspec.models import load_model, tokenizer_fingerprint


def test_loads_a_local_directory(tiny):
    target = tiny["target"]
    assert target.vocab_size == 259 and target.max_model_len == 160
    assert target.eos_token_ids == (2,) and target.bos_token_id == 1


def test_fingerprint_follows_the_vocabulary(tiny):
    assert tiny["target"].fingerprint == tiny["draft_noisy"].fingerprint
    assert tiny["target"].fingerprint == tokenizer_fingerprint(tiny["target"].tokenizer)
    vocab = tiny["target"].tokenizer.get_vocab()
    assert len(vocab) == 259


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "nope")):
        load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "remove,missing",
    [
        (["config.json"], "config.json"),
        (["model.safetensors"], "weights"),
        (["tokenizer.json", "tokenizer_config.json"], "tokenizer"),
    ],
)
def test_malformed_directory_names_path_and_missing_file(tiny_dirs, tmp_path, remove, missing):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["target"], broken)
    for name in remove:
        (broken / name).unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(str(broken))
    assert str(broken) in str(info.value) and missing in str(info.value)


def test_corrupt_config_is_reported(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["target"], broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(str(broken))


def test_max_model_len_cannot_exceed_the_model(tiny_dirs):
    with pytest.raises(ModelLoadError, match="--max-model-len 999"):
        load_model(str(tiny_dirs["target"]), max_model_len=999)


def test_load_vocabulary_reads_config_and_tokenizer_without_weights(tiny_dirs, tmp_path):
    import shutil

    from splitspec.models import load_model, load_vocabulary

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dirs["target"], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    vocabulary = load_vocabulary(str(bare))
    full = load_model(str(tiny_dirs["target"]), device="cpu", dtype="float32")
    assert vocabulary.model is None
    for field in ("vocab_size", "max_model_len", "eos_token_ids", "bos_token_id", "fingerprint", "architecture"):
        assert getattr(vocabulary, field) == getattr(full, field), field
    assert load_vocabulary(str(bare), max_model_len=64).max_model_len == 64
