"""The CPU kernels: paged attention (`paged_attention.cpp`: attention of a step's new tokens over
their sequences' blocks where they lie in the pool, with no gathered copy of the contexts) and
the streamed linear (`streamed_linear.cpp`: the GEMM of a few rows on weights packed into
sequential panels, for models whose weights stream from memory each step).

Each is built on first use by torch's C++ extension loader (cached under `TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions, one build per vector ISA), registered under
`torch.ops.splitspec`, with fake implementations so that torch.compile calls them from its graphs
as opaque ops. Where one cannot be built (no C++ compiler, no AVX2), its caller keeps the path it
had: the paged attention gathers the contexts for SDPA, as on CUDA; the linears stay oneDNN's or
inductor's.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ISA_FLAGS = {  # torch's CPU capability -> the flags its vectorized headers need
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}
# at::parallel_for is inline: built without OpenMP, a kernel's loop runs on the calling thread
# alone, however many threads torch has (the streamed linear at 2 threads: 14.3 ms for 200 MB of
# weights without, 7.2 ms with).
OPENMP_FLAGS = ["-fopenmp"]


@functools.cache
def cpu_paged_attention() -> bool:
    """Whether `torch.ops.splitspec.paged_attention` runs on this CPU; builds and loads it on the
    first call (tens of seconds; then cached on disk)."""
    if not _build("paged_attention"):
        return False
    torch.library.register_fake("splitspec::paged_attention")(_fake_paged_attention)
    return True


@functools.cache
def cpu_streamed_linear() -> bool:
    """Whether `torch.ops.splitspec.streamed_linear` runs on this CPU (AVX-512 or AVX2); builds and
    loads it on the first call."""
    if torch.backends.cpu.get_cpu_capability() not in ISA_FLAGS or not _build("streamed_linear"):
        return False
    torch.library.register_fake("splitspec::streamed_linear")(_fake_streamed_linear)
    return True


def _build(kernel: str) -> bool:
    """Build (or load from the disk cache) `<kernel>.cpp` beside this file for this CPU's vector ISA."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        _find_ninja()
        load(name=f"splitspec_{kernel}_{capability.lower()}", sources=[str(Path(__file__).with_name(f"{kernel}.cpp"))],
             extra_cflags=["-O3", *OPENMP_FLAGS, *ISA_FLAGS.get(capability, [])], extra_ldflags=OPENMP_FLAGS,
             is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, or it failed: the caller keeps its other path
        log.warning("CPU kernel not built; its fallback serves", extra={"kernel": kernel, "error": str(error)[:500]})
        return False
    log.info("CPU kernel loaded", extra={"kernel": kernel, "isa": capability,
                                         "threads": parallel_threads(kernel)})
    return True


def _find_ninja() -> None:
    """The C++ extension loader runs `ninja` from PATH; the `ninja` package (a dependency) puts it
    in this environment's bin directory, which is on PATH only in an activated environment."""
    import ninja

    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def parallel_threads(kernel: str) -> int:
    """How many threads `kernel`'s at::parallel_for runs on now (1 when built without OpenMP)."""
    return getattr(torch.ops.splitspec, f"{kernel}_threads")()


def _fake_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
                          scale: float, window: int, softcap: float) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def _fake_streamed_linear(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                          out_features: int) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], out_features))


def streamed_linear(input: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
    """input: [..., K] float32; packed: `pack_streamed_weight` of a [N, K] weight ([panels, K,
    panel], this CPU's panel width); bias: [N] or None -> [..., N = out_features]."""
    return torch.ops.splitspec.streamed_linear(input, packed, bias, out_features)


def pack_streamed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: [N, K] float32 -> the panels `streamed_linear` reads."""
    return torch.ops.splitspec.pack_streamed_weight(weight.detach().contiguous())


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, token_seq: torch.Tensor, token_pos: torch.Tensor,
                    scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """query: [T, heads, D]; key_cache / value_cache: [blocks, block_size, kv_heads, D] (this
    step's keys already written); block_tables: [B, max_blocks]; token_seq: [T] each token's row
    of block_tables; token_pos: [T] its absolute position -> [T, heads, D]. Each token attends to
    its sequence's positions up to its own (the last `window` of them with a sliding window)."""
    return torch.ops.splitspec.paged_attention(query, key_cache, value_cache, block_tables, token_seq, token_pos,
                                               scale, window or 0, softcap or 0.0)
