"""The block pool: per layer, K and V tensors [num_blocks, block_size, num_kv_heads, head_dim],
allocated once at start."""

from __future__ import annotations

import os
from typing import Any

import torch


def kv_heads_and_dim(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, head_dim


def bytes_per_block(config: Any, block_size: int, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_heads_and_dim(config)
    return 2 * layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (MemAvailable for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class KVPool:
    def __init__(self, config: Any, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 shards: int = 1) -> None:
        """`shards` > 1: this rank holds num_kv_heads / shards heads (tensor parallelism)."""
        layers, kv_heads, head_dim = kv_heads_and_dim(config)
        kv_heads //= shards
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (src -> dst) in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.keys[0].device)
        dst = torch.tensor([d for _, d in copies], device=self.keys[0].device)
        for cache in (*self.keys, *self.values):
            cache[dst] = cache[src]
