"""Tensor parallelism on CPU with Gloo: sharded logits equal the dense model's, every family's
greedy tokens at TP=2 (fused projections, projection-wide norms, sliding windows, soft-caps)
equal `transformers` eager generate, the step message round-trips, and bad sizes or
unshardable architectures are refused with the numbers or the name."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from splitspec.errors import InvalidArgument
from splitspec.paged.runner import Chunk
from target_worker.tensor_parallel import check_divisible, check_shardable_checkpoint, decode_chunks, encode_chunks
from tests.support import FAMILIES, SLIDING_WINDOW, eager_generate, save_byte_tokenizer

TOLERANCE = 1e-4


def test_step_message_round_trips():
    chunks = [Chunk([1, 2, 3], 0, [4, 5, 6], [1], 3), Chunk([9], 17, [40], [2, 5, 7], 1)]
    assert decode_chunks(encode_chunks(chunks)) == chunks


def test_sizes_that_do_not_divide_the_heads_are_refused(tiny):
    config = tiny["target"].model.config  # 4 query heads, 2 KV heads
    check_divisible(config, 2)
    with pytest.raises(InvalidArgument, match=r"^--tensor-parallel-size: 4 must divide num_attention_heads \(4\) "
                                              r"and num_key_value_heads \(2\)"):
        check_divisible(config, 4)


def _rank(rank: int, size: int, address: str, model_dir: str, prompts: list[list[int]], out: str) -> None:
    from splitspec.models import load_model
    from splitspec.paged.block_manager import BlockManager
    from splitspec.paged.kv_pool import KVPool
    from splitspec.paged.runner import PagedRunner
    from target_worker.tensor_parallel import init_group, shard_model

    torch.set_num_threads(1)
    loaded = load_model(model_dir, "cpu", "float32")
    init_group(address, rank, size, "cpu")
    shard_model(loaded.model, rank, size)
    blocks = BlockManager(64, 4)
    runner = PagedRunner(loaded.model, KVPool(loaded.model.config, 64, 4, torch.float32, loaded.device, size))
    chunks = []
    for i, prompt in enumerate(prompts):
        blocks.allocate(str(i), prompt)
        chunks.append(Chunk(prompt, 0, blocks.slots(str(i), 0, len(prompt)), list(blocks.tables[str(i)].block_ids),
                            len(prompt)))
    logits = runner.forward(chunks)
    extension = []
    for i, prompt in enumerate(prompts):
        slots, _ = blocks.append_slots(str(i), 2)
        extension.append(Chunk([7, 8], len(prompt), slots, list(blocks.tables[str(i)].block_ids), 2))
    logits += runner.forward(extension)
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


def sharded_logits(model_dir: str, prompts: list[list[int]], tmp_path, size: int = 2) -> list[torch.Tensor]:
    from target_worker.tensor_parallel import free_address

    out = str(tmp_path / "logits.pt")
    mp.start_processes(_rank, args=(size, free_address(), model_dir, prompts, out), nprocs=size, join=True,
                       start_method="spawn")
    return torch.load(out)


def check_against_dense(loaded, logits, prompts):
    with torch.inference_mode():
        for prompt, prefill, extended in zip(prompts, logits[: len(prompts)], logits[len(prompts):]):
            assert (prefill - loaded.model(torch.tensor([prompt])).logits[0]).abs().max() <= TOLERANCE
            reference = loaded.model(torch.tensor([prompt + [7, 8]])).logits[0, -2:]
            assert (extended - reference).abs().max() <= TOLERANCE


def test_tp2_logits_match_the_dense_model_with_gqa(tiny_dirs, tiny, tmp_path):
    prompts = [[1] + list(range(10, 10 + n)) for n in (2, 9, 14)]
    logits = sharded_logits(str(tiny_dirs["target"]), prompts, tmp_path)
    check_against_dense(tiny["target"], logits, prompts)  # vocab 259: an uneven LM-head split


@pytest.mark.real_models
def test_tp2_logits_match_on_the_real_target(real, tmp_path):
    from tests.support import real_model_dir

    prompts = [real["target"].tokenizer("Once upon a time, there was a little girl named Lily.").input_ids]
    logits = sharded_logits(str(real_model_dir() / "tinystories-260k"), prompts, tmp_path)
    check_against_dense(real["target"], logits, prompts)


GREEDY_PROMPT = [1, *range(40, 46)]
GREEDY_TOKENS = 3 * SLIDING_WINDOW


def _greedy_rank(rank: int, size: int, address: str, model_dirs: list[str], out: str) -> None:
    """Each model sharded `size` ways: prefill, then one token per step, argmax on rank 0's logits
    (every rank gets the same all-gathered logits, so all feed the same token)."""
    from splitspec.models import load_model
    from splitspec.paged.block_manager import BlockManager
    from splitspec.paged.kv_pool import KVPool
    from splitspec.paged.runner import PagedRunner
    from target_worker.tensor_parallel import init_group, shard_model

    torch.set_num_threads(1)
    init_group(address, rank, size, "cpu")
    generated = {}
    for model_dir in model_dirs:
        loaded = load_model(model_dir, "cpu", "float32")
        shard_model(loaded.model, rank, size)
        blocks = BlockManager(32, 4)
        runner = PagedRunner(loaded.model, KVPool(loaded.model.config, 32, 4, torch.float32, loaded.device, size))
        tokens = list(GREEDY_PROMPT)
        blocks.allocate("s", tokens)
        chunk = Chunk(tokens, 0, blocks.slots("s", 0, len(tokens)), list(blocks.tables["s"].block_ids), 1)
        generated[model_dir] = []
        for _ in range(GREEDY_TOKENS):
            token = int(runner.forward([chunk])[0][-1].argmax())
            generated[model_dir].append(token)
            slots, _ = blocks.append_slots("s", 1)
            chunk = Chunk([token], len(tokens), slots, list(blocks.tables["s"].block_ids), 1)
            tokens.append(token)
    if rank == 0:
        torch.save(generated, out)
    torch.distributed.barrier()
    os._exit(0)  # no Gloo teardown: a rank tearing down while its peer still does aborted 1 run in ~15


def test_tp2_greedy_tokens_of_every_family_match_transformers(family_dirs, tmp_path):
    from target_worker.tensor_parallel import free_address

    model_dirs = [str(family_dirs[family][0]) for family in FAMILIES]
    out = str(tmp_path / "generated.pt")
    mp.start_processes(_greedy_rank, args=(2, free_address(), model_dirs, out), nprocs=2, join=True,
                       start_method="spawn")
    generated = torch.load(out)
    for family, model_dir in zip(FAMILIES, model_dirs):
        assert generated[model_dir] == eager_generate(model_dir, GREEDY_PROMPT, GREEDY_TOKENS), family


def test_an_architecture_it_cannot_shard_is_refused_by_name_before_loading(tmp_path):
    """A mixture of experts: refused from its config alone (the directory holds no weights)."""
    from transformers import MixtralConfig

    MixtralConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=2, architectures=["MixtralForCausalLM"]
                  ).save_pretrained(tmp_path)
    save_byte_tokenizer(tmp_path)
    with pytest.raises(InvalidArgument, match=r"^--tensor-parallel-size: MixtralForCausalLM cannot be sharded: "
                                              r"layer 0's MixtralSparseMoeBlock has \w+"):
        check_shardable_checkpoint(str(tmp_path), 2)
