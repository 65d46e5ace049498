"""Test support: tiny random Hugging Face models on disk, and a whole stack on loopback."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.server import CoordinatorConfig, start_coordinator
from draft_worker.server import start_draft, start_ngram_draft
from splitspec.layerskip import skip_layers
from splitspec.models import LoadedModel, load_model
from splitspec.paged.cache import CacheConfig
from splitspec.service import RunningServer, make_channel
from splitspec.v1 import coordinator_pb2_grpc
from target_worker.server import start_target

BYTE_VOCAB = 259  # <unk>, <s>, </s> + 256 byte tokens


def save_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)


_TOKENIZER_CORPUS = [
    "Once upon a time there was a little girl named Lily.", "She liked to play in the park with her dog.",
    "Tom and Lily went to the park and saw a big red ball.", "héllo wörld ✓ naïve café", "One day, a cat ran.",
]


def sentencepiece_tokenizer(vocab_size: int = 200) -> Any:
    """A Llama/SentencePiece-style tokenizer: BPE over '▁'-joined words with byte fallback
    (`<0x00>`..`<0xFF>` after <unk>, <s>, </s>), decoded as Llama's tokenizer.json decodes."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(_TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_level_bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A GPT-2-style byte-level BPE trained on a small corpus: merged tokens may hold part of a
    multi-byte character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


SLIDING_WINDOW = 12  # tiny families with a sliding window use this one: tests run far past it
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.08, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_SLIDING = dict(sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"])
FAMILIES: dict[str, tuple[str, dict]] = {  # family -> (transformers config class, what it sets beyond _TINY)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=0)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=SLIDING_WINDOW)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                                    final_logit_softcapping=3.0, **_SLIDING)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, **_SLIDING)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                      logits_scaling=2.0)),
    "olmo2": ("Olmo2Config", {}),
}


def save_tiny_model(directory: Path, family: str, seed: int, base: Path | None = None, noise: float = 0.0,
                    rows: int = BYTE_VOCAB, max_positions: int = 160, **config: Any) -> Path:
    """A random model of `family` (see FAMILIES) over the byte tokenizer, with `rows` embedding
    rows and `config` over the family's settings; with `base`, a copy of that model's weights plus
    Gaussian noise."""
    import transformers

    class_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, class_name)(vocab_size=rows, max_position_embeddings=max_positions,
                                               **{**_TINY, **extra, **config})
    model = transformers.AutoModelForCausalLM.from_config(config)
    if base is not None:
        model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(base).state_dict())
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(noise * parameter.std() * torch.randn_like(parameter))
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def eager_generate(directory: Path, prompt_ids: list[int], max_new_tokens: int, **overrides) -> list[int]:
    """Greedy tokens of `transformers` itself, eager attention (config `overrides` applied)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", **overrides)
    model.generation_config.eos_token_id = None  # what is unset in a GenerationConfig falls back to it
    with torch.inference_mode():
        out = model.eval().generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def save_tiny_llama(
    directory: Path,
    seed: int,
    max_positions: int = 160,
    base: Path | None = None,
    noise: float = 0.0,
    vocab_size: int = BYTE_VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    """A random Llama; with `base`, a copy of that model's weights plus Gaussian noise."""
    return save_tiny_model(directory, "llama", seed, base, noise, vocab_size, max_positions,
                           num_attention_heads=heads, num_key_value_heads=kv_heads)


def save_padded_copy(source: Path, directory: Path, rows: int, seed: int = 0) -> Path:
    """`source` with its embedding and LM head padded to `rows` rows, as Qwen2.5's larger sizes are.
    The padded head rows score far above every real token, so a server that lets them through
    emits them (greedy) or samples them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    real_rows = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[real_rows:] = 50 * head[:real_rows].std() * torch.randn(rows - real_rows, head.shape[1])
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def real_model_dir() -> Path:
    """The TinyStories pair, or skip with the reason."""
    value = os.environ.get("SPLITSPEC_MODEL_DIR")
    if not value:
        pytest.skip("SPLITSPEC_MODEL_DIR is not set: the real TinyStories pair is unavailable")
    path = Path(value)
    if not (path / "tinystories-260k").is_dir() or not (path / "tinystories-xs").is_dir():
        pytest.skip(f"SPLITSPEC_MODEL_DIR={value} does not hold tinystories-260k and tinystories-xs")
    return path


def layerskip_draft(model_dir: Path | str, skip: list[int]) -> LoadedModel:
    """A self-speculative draft: its own copy of the target's weights, `skip` layers dropped."""
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    skip_layers(loaded.model, skip)
    return loaded


@dataclass
class Stack:
    target: RunningServer
    draft: RunningServer | None
    coordinator: RunningServer
    stub: coordinator_pb2_grpc.CoordinatorStub

    async def stop(self) -> None:
        await self.coordinator.stop(0)  # drains in-flight Release calls before closing its channels
        for server in (self.draft, self.target):
            if server is not None:
                await server.stop(0)


def soak_requests(full: int) -> int:
    """Requests a soak test sends: a third of `full` by default (CI time), all of it with
    SPLITSPEC_SOAK=full."""
    return full if os.environ.get("SPLITSPEC_SOAK") == "full" else full // 3


async def start_stack(
    target: LoadedModel,
    draft: LoadedModel | None,
    k: int = 4,
    max_k: int = 16,
    target_cache: CacheConfig | None = None,
    draft_cache: CacheConfig | None = None,
    batching: bool = True,
    overlap: bool = False,
    overlap_width: int = 3,
    ngram: tuple[int, int] | None = None,
    compile: bool = False,
) -> Stack:
    """Real servers on free loopback ports, in this process. `ngram=(min, max)`: the draft worker
    is n-gram lookup over the target's vocabulary instead of `draft`; `compile`: both workers run
    their forward through torch.compile (a few graphs each, compiled before they serve)."""
    target_server = await start_target(target, cache=target_cache or CacheConfig(num_blocks=512), batching=batching,
                                       compile=compile)
    if ngram is not None:
        draft_server = await start_ngram_draft(target, max_k=max_k, ngram_min=ngram[0], ngram_max=ngram[1])
    else:
        draft_server = (await start_draft(draft, max_k=max_k, cache=draft_cache or CacheConfig(num_blocks=512),
                                          compile=compile)
                        if draft is not None else None)
    coordinator = await start_coordinator(
        CoordinatorConfig(
            target=target_server.address,
            draft=draft_server.address if draft_server else None,
            port=0,
            host="127.0.0.1",
            k=k if draft_server else 0,  # may be AUTO_K
            max_k=max_k,
            connect_timeout=10,
            overlap=overlap,
            overlap_width=overlap_width,
        )
    )
    stub = coordinator_pb2_grpc.CoordinatorStub(make_channel(coordinator.address))
    return Stack(target_server, draft_server, coordinator, stub)


async def collect(stub: coordinator_pb2_grpc.CoordinatorStub, request, timeout: float = 120) -> dict:
    """Run one Generate to the end; returns token ids, text, origins and the final message."""
    responses = [r async for r in stub.Generate(request, timeout=timeout)]
    return {
        "token_ids": [t for r in responses for t in r.token_ids],
        "origins": [o for r in responses for o in r.origins],
        "text": "".join(r.text for r in responses),
        "last": responses[-1],
        "responses": responses,
    }


async def wait_until_idle(target: RunningServer, draft: RunningServer, timeout: float = 5.0) -> None:
    """Poll until both in-process workers hold no sequence and every KV block is free; fail naming
    what is left otherwise."""
    import asyncio

    for _ in range(int(timeout / 0.02)):
        t, d = target.state, draft.state
        if (not t.sequences and not t.suspended and t.blocks.num_free_blocks == t.blocks.num_blocks
                and d.open_sequences == 0
                and (not hasattr(d, "blocks") or d.blocks.num_free_blocks == d.blocks.num_blocks)):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not back to baseline: target sequences {list(target.state.sequences)}, suspended "
                f"{list(target.state.suspended)}, draft open {draft.state.open_sequences}, free blocks "
                f"{target.state.blocks.num_free_blocks}/{getattr(getattr(draft.state, 'blocks', None), 'num_free_blocks', '-')}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_logged(args: list[str], name: str, **popen: Any):
    """A process whose stdout and stderr go to a log file, never to a pipe: a pipe that nobody
    drains fills at 64 KiB and then blocks the server on its next log line (a fuzz run that logs a
    warning per refused request wedged the target that way). `log_tail(process)` reads it back."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(prefix=f"splitspec-{name}-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
    process.log_path = log.name
    return process


def log_tail(process, chars: int = 3000) -> str:
    """The last `chars` characters a `spawn_logged` process wrote."""
    with open(process.log_path, errors="replace") as handle:
        return handle.read()[-chars:]


def stop_logged(process, timeout: float = 60) -> None:
    """SIGTERM and wait; a process still running after `timeout` dumps its threads' stacks into its
    log (SIGUSR1), is killed, and fails the test with that log's tail."""
    import signal
    import subprocess
    import time

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        process.kill()
        pytest.fail(f"{process.args[3]} did not stop within {timeout} s of SIGTERM; its log ends:\n{log_tail(process, 6000)}")


def launch_up(*args: str, timeout: float = 180):
    """`splitspec up ARGS` in its own session; returns (process, coordinator address) once healthy.
    Eager (`--enforce-eager`): these tests are not about compiling and skip its start-up minute.
    The coordinator's port is `up`'s choice (`--port 0`), read from the line it prints when up."""
    import re
    import sys
    import time

    if "--http-port" not in args:
        args = (*args, "--http-port", "0")  # no gateway unless the test asks for one
    args = (*args, "--enforce-eager")
    process = spawn_logged([sys.executable, "-m", "entrypoints.cli", "up", "--port", "0", *args], "up",
                           start_new_session=True)
    deadline, ready = time.monotonic() + timeout, []
    while time.monotonic() < deadline and not ready:
        ready = [line for line in log_tail(process, 10**7).splitlines() if line.startswith("splitspec is up")]
        if process.poll() is not None:
            pytest.fail(f"splitspec up exited: {log_tail(process)}")
        time.sleep(0.2)
    if not ready:
        process.kill()
        pytest.fail("splitspec up did not become healthy")
    address = re.search(r"coordinator at (127\.0\.0\.1:(\d+))", ready[0])
    assert address and int(address.group(2)) > 0, ready[0]
    return process, address.group(1)


def process_tree(pid: int) -> list[int]:
    """pid's descendants (children first)."""
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    found = []
    for child in map(int, children):
        found.append(child)
        found.extend(process_tree(child))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def spawn_worker(kind: str, model_dir, port: int | None = None, *extra: str, timeout: float = 60):
    """`splitspec target|draft` as a real process on loopback; returns (process, address) once SERVING."""
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = port or free_port()
    process = spawn_logged(
        [sys.executable, "-m", "entrypoints.cli", kind, "--model", str(model_dir), "--port", str(port),
         "--host", "127.0.0.1", "--threads", "1", "--log-level", "warning", "--enforce-eager", *extra], kind)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"{kind} worker exited: {log_tail(process)}")
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    process.kill()
    pytest.fail(f"{kind} worker did not become healthy")
