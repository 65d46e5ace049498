"""Packed variable-length forward passes over the paged pool: one call runs many sequences'
new tokens (prefill chunks, verification windows, draft steps) together."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from splitspec.paged.attention import PagedMetadata, use_paged_attention
from splitspec.paged.compiled import CompiledForward
from splitspec.paged.cpu_wait import cpu_wait_ns
from splitspec.paged.kernels import cpu_paged_attention, cpu_streamed_linear
from splitspec.paged.kv_pool import KVPool
from splitspec.paged.packed_linear import can_pack, pack_linears

CALIBRATION_STEPS = (8, 16, 32, 64, 128)  # one-token rows per step, timed compiled and eager by calibrate()
CALIBRATION_REPEATS = 3
CALIBRATION_CONTEXT = 128  # tokens each row attends to: the attention's cost differs between the two paths
QUIET_SHARE = 0.05         # a timed run is quiet where the process's threads waited for a CPU at most this share of it
QUIET_WAIT_SECONDS = 120.0  # calibration waits this long in all for quiet runs, then compares every run's least
QUIET_PAUSE_SECONDS = 0.5   # between tries while other work holds the cores
STREAMED_WEIGHT_BYTES = 32 * 2**20  # weights past this stream from memory each step: the batch GEMMs are timed


@dataclass(slots=True)
class Chunk:
    """One sequence's part of a batch."""

    token_ids: list[int]    # new tokens, written at positions start .. start + len - 1
    start: int              # tokens already in the cache
    slots: list[int]        # pool slot of each new token
    block_table: list[int]  # the sequence's blocks, covering start + len tokens
    num_logits: int         # logits wanted for the last num_logits new tokens


class PagedRunner:
    def __init__(self, model: Any, pool: KVPool, compile: bool = False, pack: bool = True,
                 paged_kernel: bool = True, gemm_kernel: bool = True) -> None:
        """`compile`: run the forward through torch.compile (`CompiledForward`); else eagerly.
        `pack`: on the CPU, pack the model's linears for oneDNN first (`pack_linears`), in place.
        `paged_kernel`: on the CPU, attention through the paged kernel where it builds
        (`kernels.py`); else (and on other devices) each context is gathered for SDPA.
        `gemm_kernel`: compiled, packed, on the CPU in float32, for a model whose weights stream
        from memory each step (STREAMED_WEIGHT_BYTES): the graphs' linears through the streamed
        linear kernel where it builds, not inductor's templates or oneDNN."""
        self.model = model
        self.pool = pool
        self.device = next(model.parameters()).device
        self.paged_kernel = paged_kernel and self.device.type == "cpu" and cpu_paged_attention()
        self.weight_bytes = weight_bytes(model)  # before packing moves the linears' weights out of the parameters
        packs = pack and can_pack(model)
        self.gemm_kernel = (gemm_kernel and compile and packs and next(model.parameters()).dtype == torch.float32
                            and self.weight_bytes >= STREAMED_WEIGHT_BYTES and cpu_streamed_linear())
        if packs:
            pack_linears(model, keep_dense=compile, streamed=self.gemm_kernel)
        use_paged_attention(model)
        self.compiled = CompiledForward(model, self.device) if compile else None

    @property
    def compiles(self) -> int:
        """Graphs compiled so far (0 when eager)."""
        return self.compiled.compiles if self.compiled is not None else 0

    def warm_up(self) -> None:
        """Compile before serving (no request waits for it): the one-token graph and, where the
        graphs take a step of 5 tokens, the padded batch graph. Writes K/V into block 0 only (any
        pool has it), which no sequence holds yet."""
        if self.compiled is None:
            return
        self.forward([Chunk(token_ids=[0], start=1, slots=[0], block_table=[0], num_logits=1)])
        if not self.compiled.takes(5):
            return
        self.forward([Chunk(token_ids=[0, 0], start=0, slots=[0, 0], block_table=[0], num_logits=2),
                      Chunk(token_ids=[0, 0, 0], start=0, slots=[0, 0, 0], block_table=[0], num_logits=1)])

    def choose_batch_gemms(self, repeats: int = CALIBRATION_REPEATS,
                           min_weight_bytes: int = STREAMED_WEIGHT_BYTES) -> dict[str, float]:
        """On the CPU, for a model whose weights do not stay in cache: time the padded batch graph
        on a step of CALIBRATION_STEPS[0] one-token rows with its linears as C++ templates and as
        oneDNN calls, and keep the faster (`CompiledForward.use_batch_gemms`). Returns {gemms: ms}
        for those timed ({} when not timed). Compiles one more graph; the one kept serves from now."""
        compiled = self.compiled
        if compiled is None or self.device.type != "cpu" or self.weight_bytes < min_weight_bytes or self.gemm_kernel:
            return {}  # (the streamed linear kernel: the graphs' linears are its, whichever is chosen)
        step = self._calibration_step(CALIBRATION_STEPS[0])
        timed = {}
        for gemms in ("templates", "onednn"):
            compiled.use_batch_gemms(gemms)
            timed[gemms] = self._step_ms(step, len(step), repeats)
        compiled.use_batch_gemms(min(timed, key=timed.__getitem__))
        return timed

    def _calibration_step(self, tokens: int) -> list[Chunk]:
        """`tokens` one-token rows over CALIBRATION_CONTEXT tokens each (fewer where the model has
        fewer positions), all reading and writing block 0 (every row's table repeats it), as
        warm_up does."""
        context = min(CALIBRATION_CONTEXT, getattr(self.model.config, "max_position_embeddings", None) or
                      CALIBRATION_CONTEXT)
        blocks = -(-context // self.pool.block_size)
        return [Chunk(token_ids=[0], start=context - 1, slots=[0], block_table=[0] * blocks, num_logits=1)] * tokens

    def calibrate(self, repeats: int = CALIBRATION_REPEATS) -> dict[int, tuple[float, float]]:
        """Where the graphs take steps of a limited size (CPU), raise the limit to the longest step
        of CALIBRATION_STEPS up to which the graphs beat the eager forward on packed weights, timed
        here on `_calibration_step`s of that many rows. The crossover is the CPU's: an AVX-512 VM
        ran eager faster from 6 rows on with inductor's 8-row micro-GEMMs and from 64 with 6-row
        ones, an AVX2 one ran the graphs faster at 32 rows (79.6 against 110.4 ms). Stops at the
        first step the graphs lose. Returns {tokens: (graph ms, eager ms)} for the steps timed."""
        compiled = self.compiled
        if compiled is None or compiled.max_tokens is None:
            return {}
        timed: dict[int, tuple[float, float]] = {}
        limit, deadline = compiled.max_tokens, time.monotonic() + QUIET_WAIT_SECONDS
        for tokens in CALIBRATION_STEPS:
            if tokens <= limit:
                continue
            step = self._calibration_step(tokens)
            timed[tokens] = self._compare_ms(step, tokens, repeats, deadline)
            if timed[tokens][0] > timed[tokens][1]:
                break
            limit = tokens
        compiled.max_tokens = limit
        return timed

    def _compare_ms(self, step: list[Chunk], tokens: int, repeats: int, deadline: float) -> tuple[float, float]:
        """(graph ms, eager ms) of `step`: the least of `repeats` quiet runs each (`_timed_run`),
        graph and eager in turn, waiting for quiet runs until `deadline` (time.monotonic()), then
        the least of every run. A target starting beside a compiling draft read 110.8 ms for the
        16-token graph against 107.6 eager (14.7 against 30.4 for 8 tokens when quiet) and kept
        8 tokens: its steps of 16 and 32 ran eagerly, at 0.6x the tok/s."""
        runs: dict[int, list[tuple[float, bool]]] = {tokens: [], 0: []}  # graph tokens -> (ms, quiet)
        while True:
            for graph_tokens, timed in runs.items():
                timed.append(self._timed_run(step, graph_tokens))
            quiet = {graph_tokens: [ms for ms, calm in timed if calm] for graph_tokens, timed in runs.items()}
            if all(len(times) >= repeats for times in quiet.values()):
                break
            if time.monotonic() >= deadline:
                if not all(quiet.values()):
                    quiet = {graph_tokens: [ms for ms, _ in timed] for graph_tokens, timed in runs.items()}
                break
            if not all(timed[-1][1] for timed in runs.values()):
                time.sleep(QUIET_PAUSE_SECONDS)
        return min(quiet[tokens]), min(quiet[0])

    def _timed_run(self, step: list[Chunk], graph_tokens: int) -> tuple[float, bool]:
        """(ms, quiet) of one run of `step` (after one unmeasured call) with the graphs taking up to
        `graph_tokens`: quiet where this process's threads waited for a CPU at most QUIET_SHARE of
        it (always, where the kernel does not say)."""
        with self._graphs_taking(graph_tokens):
            self.forward(step)
            waited, started = cpu_wait_ns(), time.perf_counter()
            self.forward(step)
            seconds, waited_after = time.perf_counter() - started, cpu_wait_ns()
        quiet = waited is None or waited_after is None or (waited_after - waited) / 1e9 <= QUIET_SHARE * seconds
        return 1000 * seconds, quiet

    def _step_ms(self, step: list[Chunk], graph_tokens: int, repeats: int) -> float:
        """Median ms of `step` (after one unmeasured call) with the graphs taking up to `graph_tokens`."""
        with self._graphs_taking(graph_tokens):
            self.forward(step)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.forward(step)
                times.append(1000 * (time.perf_counter() - started))
        return statistics.median(times)

    @contextlib.contextmanager
    def _graphs_taking(self, graph_tokens: int) -> Iterator[None]:
        """The graphs take steps of up to `graph_tokens` tokens inside the block (0: none)."""
        compiled = self.compiled
        kept, compiled.max_tokens = compiled.max_tokens, graph_tokens
        try:
            yield
        finally:
            compiled.max_tokens = kept

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write of whole blocks (src, dst) before they are written."""
        self.pool.copy_blocks(copies)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Returns, per chunk, logits [num_logits, vocab] (float32, on the CPU)."""
        device, lengths = self.device, [len(c.token_ids) for c in chunks]
        total, max_q = sum(lengths), max(lengths)
        compiled = self.compiled is not None and self.compiled.takes(total)
        max_blocks = max(max(len(c.block_table) for c in chunks), 2 if compiled else 1)
        positions = [torch.arange(c.start, c.start + length) for c, length in zip(chunks, lengths)]
        padded = compiled and total > 1
        rows = max(len(chunks), 2) if padded else len(chunks)  # a padded step has no size 1
        tables = [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks]
        tables += [[0] * max_blocks] * (rows - len(chunks))
        metadata = PagedMetadata(
            pool=self.pool,
            slot_mapping=torch.tensor([s for c in chunks for s in c.slots], dtype=torch.long, device=device),
            max_context=max(c.start + length for c, length in zip(chunks, lengths)),
        )
        if self.paged_kernel:
            metadata.block_tables = torch.tensor(tables, dtype=torch.long, device=device)
            metadata.token_seq = torch.tensor([b for b, length in enumerate(lengths) for _ in range(length)],
                                              dtype=torch.long, device=device)
            metadata.token_pos = torch.cat(positions).to(device)
        else:
            self._gather(metadata, chunks, positions, tables, max_q, compiled, padded)
        logit_rows: list[int] = []
        offset = 0
        for chunk, length in zip(chunks, lengths):
            logit_rows.extend(range(offset + length - chunk.num_logits, offset + length))
            offset += length
        wanted = len(logit_rows)
        if padded and wanted == 1:
            logit_rows.append(logit_rows[0])
        input_ids = torch.tensor([[t for c in chunks for t in c.token_ids]], dtype=torch.long, device=device)
        position_ids = torch.cat(positions).unsqueeze(0).to(device)  # packed order
        logits_to_keep = torch.tensor(logit_rows, dtype=torch.long, device=device)
        inputs = dict(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),  # unused: no dense mask built
            use_cache=False,
            paged=metadata,
            logits_to_keep=logits_to_keep,
        )
        if not compiled:
            out = self.model(**inputs)
        else:
            out = self.compiled(self._dynamic_dims(metadata, input_ids, position_ids, logits_to_keep, padded), **inputs)
        logits = out.logits[0, :wanted].float().cpu()
        return list(torch.split(logits, [c.num_logits for c in chunks]))

    def _gather(self, metadata: PagedMetadata, chunks: list[Chunk], positions: list[torch.Tensor],
                tables: list[list[int]], max_q: int, compiled: bool, padded: bool) -> None:
        """`metadata` for attention over gathered contexts: a batch of queries padded to
        [rows, width], a mask over the keys, or one sequence's consecutive blocks as a view."""
        device, rows, total = self.device, len(tables), len(metadata.slot_mapping)
        # Compiled, every key of the gathered blocks is a column of the mask (no slice whose size
        # could equal the blocks' and split the graph), and a batch of two or more tokens takes the
        # general layout with no dimension of size 1 (padding rows), so that one dynamic graph
        # serves all of them; one token of one sequence is the other graph.
        if compiled:
            metadata.max_context = len(tables[0]) * self.pool.block_size
        max_context = metadata.max_context
        width = max(max_q, 2) if padded else max_q
        first = chunks[0].block_table
        if not compiled and len(chunks) == 1 and first == list(range(first[0], first[0] + len(first))):
            metadata.block_range = (first[0], len(first))  # one sequence on consecutive blocks: a view, no gather
        else:
            metadata.block_tables = torch.tensor(tables, dtype=torch.long, device=device)
        if rows == 1:  # one sequence: its queries are the packed row as they are
            query_positions = positions[0].view(1, -1)
        else:
            query_positions = self._pack(metadata, positions, total, rows, width)
        metadata.query_positions = query_positions.to(device)
        if width > 1 or rows > 1 or compiled:  # eager, one token of one sequence sees all its keys: no mask
            mask = torch.arange(max_context).view(1, 1, -1) <= query_positions.unsqueeze(-1)
            metadata.mask = mask.unsqueeze(1).to(device)

    @staticmethod
    def _dynamic_dims(metadata: PagedMetadata, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      logits_to_keep: torch.Tensor, padded: bool) -> tuple[tuple[torch.Tensor, tuple[int, ...]], ...]:
        """Every size that varies between steps: of a padded batch (none is 1), or of one token of
        one sequence (its blocks and keys)."""
        if metadata.token_seq is not None:
            if not padded:
                return ((metadata.block_tables, (1,)),)
            return ((input_ids, (1,)), (position_ids, (1,)), (logits_to_keep, (0,)), (metadata.slot_mapping, (0,)),
                    (metadata.token_seq, (0,)), (metadata.token_pos, (0,)), (metadata.block_tables, (0, 1)))
        if not padded:
            return ((metadata.block_tables, (1,)), (metadata.mask, (3,)))
        return ((input_ids, (1,)), (position_ids, (1,)), (logits_to_keep, (0,)), (metadata.slot_mapping, (0,)),
                (metadata.packed_index, (0,)), (metadata.block_tables, (0, 1)), (metadata.query_index, (0, 1)),
                (metadata.query_positions, (0, 1)), (metadata.mask, (0, 2, 3)))

    def _pack(self, metadata: PagedMetadata, positions: list[torch.Tensor], total: int, rows: int,
              width: int) -> torch.Tensor:
        """Index maps between the packed row [T] and the padded batch [rows, width]; returns the
        padded query positions [rows, width] (positions: each sequence's new token positions;
        padding rows and columns: position 0, query the zero row T)."""
        query_index = torch.full((rows, width), total, dtype=torch.long)
        query_positions = torch.zeros((rows, width), dtype=torch.long)
        packed_index = torch.empty(total, dtype=torch.long)
        offset = 0
        for b, sequence_positions in enumerate(positions):
            length = len(sequence_positions)
            query_index[b, :length] = torch.arange(offset, offset + length)
            query_positions[b, :length] = sequence_positions
            packed_index[offset : offset + length] = torch.arange(b * width, b * width + length)
            offset += length
        metadata.query_index = query_index.to(self.device)
        metadata.packed_index = packed_index.to(self.device)
        return query_positions


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameter storage (a tied embedding counts once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())
