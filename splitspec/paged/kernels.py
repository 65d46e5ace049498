"""The CPU paged-attention kernel (`paged_attention.cpp`): attention of a step's new tokens over
their sequences' blocks where they lie in the pool, with no gathered copy of the contexts.

Built on first use by torch's C++ extension loader (cached under `TORCH_EXTENSIONS_DIR`, by
default ~/.cache/torch_extensions, one build per vector ISA), registered as
`torch.ops.splitspec.paged_attention`, with a fake implementation so that torch.compile calls it
from its graphs as an opaque op. Where it cannot be built (no C++ compiler), the paged attention
gathers the contexts and runs SDPA, as on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
ISA_FLAGS = {  # torch's CPU capability -> the flags its vectorized headers need
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


@functools.cache
def cpu_paged_attention() -> bool:
    """Whether `torch.ops.splitspec.paged_attention` runs on this CPU; builds and loads it on the
    first call (tens of seconds; then cached on disk)."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ISA_FLAGS.get(capability, [])
    try:
        _find_ninja()
        load(name=f"splitspec_paged_attention_{capability.lower()}", sources=[str(SOURCE)],
             extra_cflags=["-O3", *flags], is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, or it failed: the gather + SDPA path serves
        log.warning("paged attention kernel not built; attention gathers each context",
                    extra={"error": str(error)[:500]})
        return False
    torch.library.register_fake("splitspec::paged_attention")(_fake_paged_attention)
    log.info("paged attention kernel loaded", extra={"isa": capability})
    return True


def _find_ninja() -> None:
    """The C++ extension loader runs `ninja` from PATH; the `ninja` package (a dependency) puts it
    in this environment's bin directory, which is on PATH only in an activated environment."""
    import ninja

    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def _fake_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
                          scale: float, window: int, softcap: float) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
                    scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """query: [T, heads, D]; key_cache / value_cache: [blocks, block_size, kv_heads, D] (this
    step's keys already written); block_tables: [B, max_blocks]; token_seq: [T] each token's row
    of block_tables; token_pos: [T] its absolute position -> [T, heads, D]. Each token attends to
    its sequence's positions up to its own (the last `window` of them with a sliding window)."""
    return torch.ops.splitspec.paged_attention(query, key_cache, value_cache, block_tables, token_seq, token_pos,
                                               scale, window or 0, softcap or 0.0)
