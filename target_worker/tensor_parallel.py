"""Tensor parallelism for the target worker on torch.distributed (Gloo on CPU, NCCL on CUDA).

Rank 0 is the serving process: it runs gRPC, the scheduler and sampling. It spawns ranks 1..N-1
itself (one command for the user). Every step, rank 0 broadcasts the step as packed int64 tensors
(which blocks to copy, then the batch's tokens, positions, slots and block tables); all ranks run
the forward pass on their shards. Sharding is Megatron-style, applied to the loaded Hugging Face
model in place:
- column-parallel Q/K/V (by heads, GQA kept) and gate/up;
- row-parallel O and down, each followed by an all-reduce;
- vocabulary-parallel LM head followed by an all-gather of the logits.
The embedding stays replicated. Each rank's paged KV pool holds only its own KV heads.
A rank that dies makes the collectives fail (UNAVAILABLE to the requests of that step), and the
watchdog then stops the worker with a non-zero exit; followers exit when rank 0 goes away.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from splitspec.errors import InvalidArgument, ModelLoadError, Unavailable
from splitspec.paged.runner import Chunk, PagedRunner

log = logging.getLogger(__name__)

OP_FORWARD, OP_COPY, OP_STOP = 1, 2, 3
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


# --- validation and sharding --------------------------------------------------------------------

def check_divisible(config: Any, size: int) -> None:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        raise InvalidArgument(
            "--tensor-parallel-size",
            f"{size} must divide num_attention_heads ({heads}) and num_key_value_heads ({kv_heads})",
        )
    if config.intermediate_size % size:
        raise InvalidArgument("--tensor-parallel-size",
                              f"{size} must divide intermediate_size ({config.intermediate_size})")


_ATTENTION_COLUMNS = ("q_proj", "k_proj", "v_proj")
_MLP_COLUMNS = ("gate_proj", "up_proj")
_PROJECTION_NORMS = ("q_norm", "k_norm")


def _parameterised_children(module: Any) -> dict[str, Any]:
    return {name: child for name, child in module.named_children() if any(True for _ in child.parameters())}


def _spans_heads(norm: Any, attention: Any) -> bool:
    """A q/k norm over the whole projection (Olmo2), not over one head (Qwen3, Gemma3)."""
    return norm.weight.numel() != attention.head_dim


def _unshardable(model: Any) -> str | None:
    """Why `model` cannot be sharded here, or None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return "it has no model.layers"
    known_attention = {*_ATTENTION_COLUMNS, "qkv_proj", "o_proj", *_PROJECTION_NORMS}
    known_mlp = {*_MLP_COLUMNS, "gate_up_proj", "down_proj"}
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            return f"layer {index} has no self_attn or no mlp"
        for part, known in ((attention, known_attention), (mlp, known_mlp)):
            for name, child in _parameterised_children(part).items():
                if name not in known:
                    return f"layer {index}'s {type(part).__name__} has {name} ({type(child).__name__})"
        if not (all(hasattr(attention, n) for n in _ATTENTION_COLUMNS) or hasattr(attention, "qkv_proj")):
            return f"layer {index}'s attention has neither q_proj/k_proj/v_proj nor qkv_proj"
        if not (all(hasattr(mlp, n) for n in _MLP_COLUMNS) or hasattr(mlp, "gate_up_proj")):
            return f"layer {index}'s mlp has neither gate_proj/up_proj nor gate_up_proj"
        if not (hasattr(attention, "o_proj") and hasattr(mlp, "down_proj")):
            return f"layer {index} has no o_proj or no down_proj"
        for name in _PROJECTION_NORMS:
            norm = getattr(attention, name, None)
            if norm is not None and _spans_heads(norm, attention) and not hasattr(norm, "variance_epsilon"):
                return f"layer {index}'s {name} ({type(norm).__name__}) spans the heads with an unknown formula"
    return None


def check_shardable(model: Any, size: int) -> None:
    """Refuse, naming the architecture, a model `shard_model` cannot split `size` ways."""
    check_divisible(model.config, size)
    reason = _unshardable(model)
    if reason:
        architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        raise InvalidArgument("--tensor-parallel-size", f"{architecture} cannot be sharded: {reason}")


def check_shardable_checkpoint(model: str, size: int) -> None:
    """`check_shardable` on the checkpoint's architecture built on the meta device: no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from splitspec.models import model_source

    try:
        config = AutoConfig.from_pretrained(model_source(model, need_weights=False))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the config of {model}: {exc}") from exc
    with torch.device("meta"):
        check_shardable(AutoModelForCausalLM.from_config(config), size)


def check_devices(device: str, size: int) -> None:
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        available = torch.cuda.device_count()
        if size > available:
            raise InvalidArgument("--tensor-parallel-size", f"{size} ranks need {size} CUDA devices; {available} visible")


def _rows(weight: torch.Tensor, rank: int, size: int, parts: list[int] | None = None) -> torch.Tensor:
    """This rank's rows of each of a fused weight's `parts` (row counts; default: one part)."""
    pieces = weight.split(parts) if parts else (weight,)
    return torch.cat([piece.chunk(size, dim=0)[rank] for piece in pieces]).clone()


def _keep_rows(linear: Any, rank: int, size: int, parts: list[int] | None = None) -> None:
    linear.weight = torch.nn.Parameter(_rows(linear.weight, rank, size, parts), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(_rows(linear.bias, rank, size, parts), requires_grad=False)


class _RankConfig:
    """The model config as one rank's attention reads it: its share of the heads (Phi3 slices its
    fused QKV output by config.num_attention_heads); everything else reads through, live."""

    def __init__(self, config: Any, size: int) -> None:
        self._config = config
        self.num_attention_heads = config.num_attention_heads // size
        self.num_key_value_heads = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class ShardedRMSNorm(torch.nn.Module):
    """An RMSNorm (weight * x / rms(x)) over a projection split across ranks: each rank holds its
    slice of the weight and the mean square is all-reduced over the whole projection."""

    def __init__(self, norm: Any, rank: int, size: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(_rows(norm.weight, rank, size), requires_grad=False)
        self.variance_epsilon = norm.variance_epsilon
        self.width = norm.weight.numel()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        square_sum = hidden_states.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(square_sum)
        hidden_states = hidden_states * torch.rsqrt(square_sum / self.width + self.variance_epsilon)
        return (self.weight * hidden_states).to(dtype)


def _all_reduce_output(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def _gather_vocab(vocab_size: int) -> Any:
    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(output) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, output.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    return hook


@torch.no_grad()
def shard_model(model: Any, rank: int, size: int) -> None:
    """Keep this rank's slice of every parallel weight and install the collectives."""
    check_shardable(model, size)
    config = model.config
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if hasattr(attention, "qkv_proj"):
            q_rows = config.num_attention_heads * attention.head_dim
            kv_rows = (attention.qkv_proj.weight.shape[0] - q_rows) // 2
            _keep_rows(attention.qkv_proj, rank, size, [q_rows, kv_rows, kv_rows])
        else:
            for name in _ATTENTION_COLUMNS:
                _keep_rows(getattr(attention, name), rank, size)
        if hasattr(mlp, "gate_up_proj"):
            half = mlp.gate_up_proj.weight.shape[0] // 2
            _keep_rows(mlp.gate_up_proj, rank, size, [half, half])
        else:
            for name in _MLP_COLUMNS:
                _keep_rows(getattr(mlp, name), rank, size)
        for name in _PROJECTION_NORMS:
            norm = getattr(attention, name, None)
            if norm is not None and _spans_heads(norm, attention):
                setattr(attention, name, ShardedRMSNorm(norm, rank, size))
        attention.config = _RankConfig(config, size)
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = attention.config.num_key_value_heads
        for linear in (attention.o_proj, mlp.down_proj):
            linear.weight = torch.nn.Parameter(linear.weight.chunk(size, dim=1)[rank].clone(), requires_grad=False)
            if linear.bias is not None and rank:
                linear.bias.zero_()  # added once, by rank 0, before the all-reduce sums the shards
            linear.register_forward_hook(_all_reduce_output)
    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0]
    per_rank = -(-vocab_size // size)
    padded = torch.zeros(per_rank * size, head.weight.shape[1], dtype=head.weight.dtype, device=head.weight.device)
    padded[:vocab_size] = head.weight
    head.weight = torch.nn.Parameter(_rows(padded, rank, size), requires_grad=False)  # unties from the embedding
    head.register_forward_hook(_gather_vocab(vocab_size))


def load_shard(model: str, device: str, dtype: str, max_model_len: int | None, rank: int, size: int) -> Any:
    """Load on the host, keep this rank's slice, and move only the slice to `device`."""
    from splitspec.models import load_model, resolve_device, resolve_dtype

    target = resolve_device(device)
    dtype_name = str(resolve_dtype(dtype, target)).removeprefix("torch.")  # "auto" means what it means on `target`
    loaded = load_model(model, "cpu", dtype_name, max_model_len)
    shard_model(loaded.model, rank, size)
    loaded.model.to(target)
    loaded.device = target
    return loaded


# --- the step message --------------------------------------------------------------------------

def encode_chunks(chunks: list[Chunk]) -> list[int]:
    payload = [len(chunks)]
    for c in chunks:
        payload += [len(c.token_ids), c.start, len(c.block_table), c.num_logits, *c.token_ids, *c.slots, *c.block_table]
    return payload


def decode_chunks(payload: list[int]) -> list[Chunk]:
    chunks, at = [], 1
    for _ in range(payload[0]):
        length, start, blocks, num_logits = payload[at : at + 4]
        at += 4
        tokens, slots, table = payload[at : at + length], payload[at + length : at + 2 * length], \
            payload[at + 2 * length : at + 2 * length + blocks]
        at += 2 * length + blocks
        chunks.append(Chunk(tokens, start, slots, table, num_logits))
    return chunks


def _broadcast(op: int, payload: list[int], device: torch.device) -> None:
    dist.broadcast(torch.tensor([op, len(payload)], dtype=torch.long, device=device), src=0)
    if payload:
        dist.broadcast(torch.tensor(payload, dtype=torch.long, device=device), src=0)


def _receive(device: torch.device) -> tuple[int, list[int]]:
    header = torch.empty(2, dtype=torch.long, device=device)
    dist.broadcast(header, src=0)
    op, length = header.tolist()
    if not length:
        return op, []
    payload = torch.empty(length, dtype=torch.long, device=device)
    dist.broadcast(payload, src=0)
    return op, payload.tolist()


class TensorParallelRunner(PagedRunner):
    """Rank 0's runner: tells the other ranks what to do, then does its own share."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self._collective(lambda: _broadcast(OP_COPY, [x for pair in copies for x in pair], self.device))
        super().copy_blocks(copies)

    def forward(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        self._collective(lambda: _broadcast(OP_FORWARD, encode_chunks(chunks), self.device))
        return self._collective(lambda: PagedRunner.forward(self, chunks))

    def stop_followers(self) -> None:
        try:
            _broadcast(OP_STOP, [], self.device)
        except RuntimeError:
            pass

    @staticmethod
    def _collective(call: Any) -> Any:
        try:
            return call()
        except RuntimeError as exc:  # a rank died or timed out: never hang, never serve half a model
            log.error("tensor-parallel collective failed", extra={"error": str(exc)[:500]})
            raise Unavailable("tensor-parallel group failed: a rank died or stopped answering") from exc


# --- process group -----------------------------------------------------------------------------

@dataclass(slots=True)
class FollowerSpec:
    model: str
    device: str
    dtype: str
    max_model_len: int | None
    num_blocks: int
    block_size: int
    threads: int | None
    address: str
    size: int


def rank_device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"


def init_group(address: str, rank: int, size: int, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)


def _exit_when_orphaned(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def follower_main(rank: int, spec: FollowerSpec, parent: int) -> None:
    """Ranks 1..N-1: load, shard, then run every step rank 0 broadcasts until told to stop."""
    from splitspec.paged.kv_pool import KVPool

    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = rank_device(spec.device, rank)
    loaded = load_shard(spec.model, device, spec.dtype, spec.max_model_len, rank, spec.size)
    init_group(spec.address, rank, spec.size, device)
    pool = KVPool(loaded.model.config, spec.num_blocks, spec.block_size, loaded.dtype, loaded.device, spec.size)
    runner = PagedRunner(loaded.model, pool)
    try:
        while True:
            op, payload = _receive(loaded.device)
            if op == OP_STOP:
                break
            if op == OP_COPY:
                runner.copy_blocks(list(zip(payload[0::2], payload[1::2])))
            else:
                runner.forward(decode_chunks(payload))
    except RuntimeError:
        os._exit(1)  # rank 0 or a peer is gone
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@dataclass(slots=True)
class TensorParallelGroup:
    """Rank 0's view: the follower processes, and a watchdog that stops the worker if one dies."""

    size: int
    processes: list[multiprocessing.Process] = field(default_factory=list)

    @classmethod
    def launch(cls, spec: FollowerSpec) -> "TensorParallelGroup":
        context = multiprocessing.get_context("spawn")
        group = cls(spec.size)
        for rank in range(1, spec.size):
            process = context.Process(target=follower_main, args=(rank, spec, os.getpid()), daemon=True,
                                      name=f"splitspec-target-rank{rank}")
            process.start()
            group.processes.append(process)
        return group

    def dead_rank(self) -> int | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                return rank
        return None

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(timeout=5)
