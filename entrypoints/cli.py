"""The `splitspec` command: run workers, the coordinator, the whole stack, or a client.

Every failure the user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_FAILURE = 1
log = logging.getLogger("entrypoints.cli")


def _add_model_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--model", required=True, help="local directory or Hugging Face hub id")
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the cores it may use)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run the model eagerly: no torch.compile (which takes a minute or more at start)")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap the context below the model's")
    parser.add_argument("--cpu-cores", default=None, help="pin the worker to these cores, e.g. 1 or 2-7")
    parser.add_argument("--model-nice", type=int, default=10, metavar="N",
                        help="run the model thread N nice levels below the worker's I/O threads, 0-19 (0: same)")
    _add_service_args(parser)
    _add_tls_args(parser, server=True)


def parse_cores(text: str) -> set[int]:
    """'3', '0,2', '0-3,6' -> core ids."""
    cores: set[int] = set()
    for part in text.split(","):
        start, _, end = part.strip().partition("-")
        cores.update(range(int(start), int(end or start) + 1))
    return cores


def _pin(cores: str | None) -> None:
    """Pin this process (and the torch threads it starts later) to the given CPU cores."""
    if cores:
        try:
            os.sched_setaffinity(0, parse_cores(cores))
        except (ValueError, OSError) as exc:
            raise ValueError(f"--cpu-cores {cores!r}: {exc}") from exc


def _verify_cores(args: argparse.Namespace) -> set[int] | None:
    """--verify-cores, checked against the cores this worker may use (after --cpu-cores)."""
    if not args.verify_cores:
        return None
    from target_worker.cores import CorePlan

    if args.tensor_parallel_size > 1 or args.threads:
        raise ValueError("--verify-cores sets the threads step by step: not with --tensor-parallel-size or --threads")
    try:
        cores = parse_cores(args.verify_cores)
    except ValueError as exc:
        raise ValueError(f"--verify-cores {args.verify_cores!r}: {exc}") from exc
    CorePlan.for_this_process(cores)  # raises, naming the flag, unless they are some of the worker's cores
    return cores


def _k_value(text: str) -> int:
    from coordinator.adaptive import AUTO_K

    return AUTO_K if text == "auto" else int(text)


def _add_drafter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-layers", default=None, help="layerskip: the target's layers to skip, e.g. 1,3")
    parser.add_argument("--skip-layers-file", default=None, help="layerskip: a JSON file from `splitspec search-skip`")
    parser.add_argument("--ngram-min", type=int, default=1, help="ngram: shortest suffix n-gram looked up")
    parser.add_argument("--ngram-max", type=int, default=4, help="ngram: longest suffix n-gram looked up (tried first)")


def _skip_layers(args: argparse.Namespace) -> list[int]:
    from splitspec.layerskip import parse_skip_layers, read_skip_file

    if args.skip_layers and args.skip_layers_file:
        raise ValueError("give --skip-layers or --skip-layers-file, not both")
    if args.skip_layers_file:
        return read_skip_file(args.skip_layers_file)
    return parse_skip_layers(args.skip_layers) if args.skip_layers else []


def _drafter_flags(args: argparse.Namespace) -> list[str]:
    """`up`'s drafter options, passed on to its draft workers."""
    flags = ["--method", args.draft_method, "--ngram-min", str(args.ngram_min), "--ngram-max", str(args.ngram_max)]
    if args.skip_layers:
        flags += ["--skip-layers", args.skip_layers]
    if args.skip_layers_file:
        flags += ["--skip-layers-file", args.skip_layers_file]
    return flags


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watchdog-seconds", type=float, default=60.0,
                        help="health goes NOT_SERVING when no step finishes this long while there is work")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool")
    parser.add_argument("--kv-cache-memory", default=None,
                        help="pool size as bytes (2GiB, 5e8) or a fraction of free device memory (0.3)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences held at once")


def _cache_config(args: argparse.Namespace) -> Any:
    from splitspec.paged.cache import CacheConfig, parse_memory

    memory = None
    if args.kv_cache_memory is not None:
        try:
            memory = parse_memory(args.kv_cache_memory)
        except ValueError as exc:
            raise ValueError(f"--kv-cache-memory {args.kv_cache_memory!r}: not a size or fraction") from exc
    return CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks, kv_cache_memory=memory,
                       max_num_seqs=args.max_num_seqs)


def _add_tls_args(parser: argparse.ArgumentParser, server: bool) -> None:
    parser.add_argument("--tls-cert", default=None, help="PEM certificate (serve TLS / present for mTLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default=None, help="PEM CA that peers must be signed by")
    if server:
        parser.add_argument("--require-client-cert", action="store_true",
                            help="mutual TLS: refuse clients without a certificate from --tls-ca")
        parser.add_argument("--reflection", action="store_true", help="enable gRPC server reflection")


def _tls(args: argparse.Namespace) -> Any:
    from splitspec.security import TLSConfig

    return TLSConfig.from_paths(args.tls_cert, args.tls_key, args.tls_ca, getattr(args, "require_client_cert", False))


def _add_service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get on SIGTERM")
    parser.add_argument("--log-level", default="info")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--k", type=int, default=None, help="draft tokens per round (0 = target only)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stop-token-id", action="append", type=int, default=None, dest="stop_token_ids")
    parser.add_argument("--ignore-eos", action="store_true", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitspec", description="Speculative decoding across gRPC workers.")
    sub = parser.add_subparsers(dest="command", required=True)

    target = sub.add_parser("target", help="run a target worker")
    _add_model_args(target, 50052)
    _add_cache_args(target)
    target.add_argument("--max-batch-tokens", type=int, default=None,
                        help="tokens per forward pass (default: max(4096, context))")
    target.add_argument("--no-batching", action="store_true", help="one sequence per forward pass (baseline)")
    target.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over N devices (N processes on a CPU)")
    target.add_argument("--verify-cores", default=None, metavar="CORES",
                        help="steps that verify proposals run on these of the worker's cores only, leaving the "
                             "rest to drafts; other steps (target-only rounds, prefills) use them all (`up` sets it)")

    draft = sub.add_parser("draft", help="run a draft worker")
    _add_model_args(draft, 50053)
    _add_cache_args(draft)
    draft.add_argument("--max-k", type=int, default=16, help="largest proposal accepted")
    draft.add_argument("--method", default="model", choices=["model", "layerskip", "ngram"],
                       help="model: --model is a separate draft model; layerskip: --model is the target, "
                            "run with the --skip-layers layers dropped; ngram: prompt lookup in the request's "
                            "history (--model: the target, for its tokenizer and context)")
    _add_drafter_args(draft)

    coord = sub.add_parser("coordinator", help="run the coordinator")
    coord.add_argument("--port", type=int, default=50051)
    coord.add_argument("--host", default="0.0.0.0")
    coord.add_argument("--target", required=True, action="append", metavar="HOST:PORT",
                       help="a target worker (repeatable; a name resolving to many addresses is a pool)")
    coord.add_argument("--draft", default=None, action="append", metavar="HOST:PORT",
                       help="a draft worker (repeatable); omit for target-only serving")
    coord.add_argument("--target-timeout", type=float, default=30.0,
                       help="seconds a prefill/verify may take before the target counts as failed")
    coord.add_argument("--draft-timeout", type=float, default=5.0,
                       help="seconds a proposal may take before the request moves to another draft or none")
    coord.add_argument("--max-running-requests", type=int, default=512)
    coord.add_argument("--max-queued-requests", type=int, default=1024,
                       help="requests waiting for a slot; beyond it RESOURCE_EXHAUSTED at once")
    coord.add_argument("--health-interval", type=float, default=1.0,
                       help="seconds between health checks / DNS re-resolution of the worker pools")
    coord.add_argument("--k", type=_k_value, default="auto",
                       help="default draft tokens per round, or 'auto' (the default: one k per batch size, "
                            "chosen by measured tokens/s, k = 0 included)")
    coord.add_argument("--max-k", type=int, default=16)
    coord.add_argument("--tokenizer", default=None, help="default: the target's model path/id")
    coord.add_argument("--connect-timeout", type=float, default=120.0)
    coord.add_argument("--auth-token", default=None, help="require 'authorization: Bearer TOKEN' from clients")
    coord.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                       help="draft the next round while the target verifies this one, once per likely verdict "
                            "(default on)")
    coord.add_argument("--overlap-width", type=int, default=3, metavar="N",
                       help="with --overlap: candidate tokens per accept length drafted for (the draft's N "
                            "most likely; (k + 1) * N branches per round)")
    coord.add_argument("--draft-confidence", type=float, default=0.0, metavar="P",
                       help="end a proposal after a draft token the draft gives less than P (dynamic draft "
                            "length, as transformers' assistant_confidence_threshold; 0 = always k tokens)")
    _add_service_args(coord)
    _add_tls_args(coord, server=True)

    up = sub.add_parser("up", help="start target, draft and coordinator locally")
    up.add_argument("--target", required=True, metavar="MODEL")
    up.add_argument("--draft", default=None, metavar="MODEL",
                    help="the draft model (--draft-method model); layerskip and ngram use the target")
    up.add_argument("--draft-method", default="model", choices=["model", "layerskip", "ngram"])
    _add_drafter_args(up)
    up.add_argument("--k", default="auto", help="draft tokens per round, or 'auto' (the default)")
    up.add_argument("--port", type=int, default=50051, help="the coordinator's gRPC port (0: a free one, printed)")
    up.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    up.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    up.add_argument("--threads", type=int, default=None)
    up.add_argument("--enforce-eager", action="store_true", help="passed to the workers: no torch.compile")
    up.add_argument("--tensor-parallel-size", type=int, default=1, help="passed to the target worker")
    up.add_argument("--http-port", type=int, default=8000, help="the gateway's port (0: no gateway)")
    up.add_argument("--targets", type=int, default=1, help="target worker replicas (a local pool)")
    up.add_argument("--drafts", type=int, default=1, help="draft worker replicas (a local pool)")
    up.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                    help="passed to the coordinator (default on)")
    up.add_argument("--overlap-width", default=None, metavar="N", help="passed to the coordinator")
    up.add_argument("--draft-confidence", default=None, metavar="P", help="passed to the coordinator")
    up.add_argument("--api-key", default=None, help="passed to the gateway")
    up.add_argument("--startup-timeout", type=float, default=600.0)
    up.add_argument("--log-level", default="warning")

    gateway = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway")
    gateway.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--host", default="0.0.0.0")
    gateway.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1")
    gateway.add_argument("--connect-timeout", type=float, default=120.0,
                         help="seconds to wait at start for the coordinator to serve")
    gateway.add_argument("--served-model-name", default=None, help="default: the target's model path/id")
    gateway.add_argument("--tokenizer", default=None, help="default: the target's model path/id")
    gateway.add_argument("--max-body-bytes", type=int, default=1 << 20)
    gateway.add_argument("--coordinator-token", default=None, help="the coordinator's --auth-token")
    gateway.add_argument("--log-level", default="info")
    _add_tls_args(gateway, server=False)

    bench = sub.add_parser("bench", help="load-test a coordinator or gateway: speculation vs target-only, with plots")
    bench.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT", help="gRPC mode")
    bench.add_argument("--gateway", default=None, metavar="URL",
                       help="HTTP mode: the gateway's base URL, e.g. http://127.0.0.1:8000 (SSE /v1/completions)")
    bench.add_argument("--prompts", required=True, help='JSON lines: {"prompt": ..., optional max_tokens}')
    bench.add_argument("--concurrency", default="1,4,16,32", help="comma-separated sweep")
    bench.add_argument("--k", default="4", help="comma-separated draft lengths, 'auto' for the coordinator's "
                                                "--k auto; k=0 (the baseline) is always run")
    bench.add_argument("--requests", type=int, default=32, help="requests per point (at least the concurrency)")
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--top-k", type=int, default=0)
    bench.add_argument("--draft-confidence", type=float, default=None, metavar="P",
                       help="sent with every request (default: the coordinator's --draft-confidence)")
    bench.add_argument("--output", default="bench-results", help="directory for bench.json and the PNG plots")
    bench.add_argument("--label", default="", help="title for the plots")
    bench.add_argument("--auth-token", default=None, help="the coordinator's --auth-token, or the gateway's --api-key")
    bench.add_argument("--no-progress", action="store_true")
    _add_tls_args(bench, server=False)

    search = sub.add_parser("search-skip", help="search which target layers a layerskip draft skips (Optuna TPE)")
    search.add_argument("--model", required=True, help="the target model (local directory or hub id)")
    search.add_argument("--prompts", required=True, help='JSON lines: {"prompt": ...}')
    search.add_argument("--trials", type=int, default=40)
    search.add_argument("--max-skip", type=int, default=None, help="most layers skipped (default: all but one)")
    search.add_argument("--num-prompts", type=int, default=8, help="prompts of the file used")
    search.add_argument("--max-tokens", type=int, default=64, help="reference tokens generated per prompt")
    search.add_argument("--temperature", type=float, default=0.0, help="0: greedy acceptance")
    search.add_argument("--max-k", type=int, default=8, help="largest k the speedup formula considers")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    search.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    search.add_argument("--threads", type=int, default=None)
    search.add_argument("--output", default="best-skip.json", help="where the best skip set and its figures go")
    search.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                        help="save the optimisation history (default path: OUTPUT with .png)")
    search.add_argument("--no-progress", action="store_true")

    stats = sub.add_parser("stats", help="show a worker's KV pool and batching figures")
    stats.add_argument("worker", metavar="HOST:PORT", help="a target or draft worker")
    stats.add_argument("--json", action="store_true")
    _add_tls_args(stats, server=False)

    gen = sub.add_parser("generate", help="stream a completion from a coordinator")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--coordinator", default="127.0.0.1:50051", metavar="HOST:PORT")
    gen.add_argument("--json", action="store_true", help="print one JSON object per request")
    gen.add_argument("--prompts-file", default=None, help='JSON lines: {"prompt": ..., optional sampling fields}')
    gen.add_argument("--concurrency", type=int, default=1)
    gen.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    gen.add_argument("--auth-token", default=None, help="bearer token for a coordinator started with --auth-token")
    _add_tls_args(gen, server=False)
    _add_sampling_args(gen)
    return parser


def _set_threads(threads: int | None) -> None:
    """`threads` torch threads; by default one per core this process may run on (after --cpu-cores:
    torch would otherwise count every core of the machine and oversubscribe the pinned ones)."""
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _worker_fields(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "port", "host", "device", "dtype", "max_model_len", "metrics_port", "grace", "watchdog_seconds",
             "reflection", "model_nice", "enforce_eager")
    if not 0 <= args.model_nice <= 19:
        raise ValueError(f"--model-nice must be between 0 and 19, got {args.model_nice}")
    return {**{name: getattr(args, name) for name in names}, "tls": _tls(args)}


def _run_service(args: argparse.Namespace, name: str) -> None:
    from splitspec.service import configure_logging, run

    configure_logging(name, args.log_level)
    _pin(getattr(args, "cpu_cores", None))
    if name == "target":
        from target_worker.server import TargetConfig, serve_target

        _set_threads(args.threads)
        if args.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
        config = TargetConfig(**_worker_fields(args), cache=_cache_config(args), max_batch_tokens=args.max_batch_tokens,
                              batching=not args.no_batching, tensor_parallel_size=args.tensor_parallel_size,
                              threads=args.threads, verify_cores=_verify_cores(args))
        run(lambda: serve_target(config))
    elif name == "draft":
        from draft_worker.server import DraftConfig, serve_draft

        _set_threads(args.threads)
        config = DraftConfig(**_worker_fields(args), cache=_cache_config(args), max_k=args.max_k,
                             method=args.method, skip_layers=_skip_layers(args), ngram_min=args.ngram_min,
                             ngram_max=args.ngram_max)
        run(lambda: serve_draft(config))
    elif name == "gateway":
        from gateway.server import GatewaySettings, serve_gateway

        settings = GatewaySettings(coordinator=args.coordinator, port=args.port, host=args.host, api_key=args.api_key,
                                   served_model_name=args.served_model_name, tokenizer=args.tokenizer,
                                   max_body_bytes=args.max_body_bytes, coordinator_token=args.coordinator_token,
                                   tls=_tls(args), connect_timeout=args.connect_timeout)
        run(lambda: serve_gateway(settings))
    else:
        from coordinator.server import CoordinatorConfig, serve_coordinator

        config = CoordinatorConfig(
            target=args.target, draft=args.draft, port=args.port, host=args.host, k=args.k, max_k=args.max_k,
            tokenizer=args.tokenizer, connect_timeout=args.connect_timeout, metrics_port=args.metrics_port,
            grace=args.grace, target_timeout=args.target_timeout, draft_timeout=args.draft_timeout,
            max_running_requests=args.max_running_requests, max_queued_requests=args.max_queued_requests,
            health_interval=args.health_interval, tls=_tls(args), auth_token=args.auth_token,
            reflection=args.reflection, overlap=args.overlap, overlap_width=args.overlap_width,
            draft_confidence=args.draft_confidence,
        )
        run(lambda: serve_coordinator(config))


# --- up ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_port_free(flag: str, port: int) -> None:
    """`up` health-checks its services by port: one already taken there would answer in their place."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a closed one's TIME_WAIT is no user
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ValueError(f"{flag} {port}: the port is in use ({exc.strerror}); is another splitspec running?") from exc


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _http_ok(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass(slots=True)
class CoreSplit:
    """`splitspec up`'s cores: the target's (`--cpu-cores`), the ones it keeps to while drafts work
    beside it (`--verify-cores`; empty: always all of its own), and the others', where the drafts,
    the coordinator and the gateway run. Empty lists: nothing pinned."""
    target: list[int]
    verify: list[int]
    others: list[int]


def _split_cores(with_draft: bool) -> CoreSplit:
    """With two or more cores, the drafts get their own (a quarter, at least one) for the steps that
    verify their proposals, so drafting overlaps verification and neither steals the other's core;
    the target's steps of target-only rounds (k = 0, chosen where speculation loses) take every core,
    the drafts' included, as the target alone would. Without a draft the target leaves the first
    core to the coordinator and gateway, as vLLM leaves one to its API server, except on two cores,
    where it takes both and shares the first with them (32 requests x 128 tokens, one run: 73.6 /
    239.2 / 512.4 / 650.1 tok/s at concurrency 1 / 4 / 16 / 32 against 51.7 / 190.4 / 426.0 /
    538.6 with the target on one core of its own). Unmeasured on more cores: there one core is a
    small share of the target's, and a thread preempted by the services stalls every parallel
    region it is part of."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return CoreSplit([], [], [])
    if not with_draft:
        return CoreSplit(cores if len(cores) == 2 else cores[1:], [], cores[:1])
    split = max(1, len(cores) // 4)
    return CoreSplit(cores, cores[split:], cores[:split])


def _cores_flag(cores: list[int]) -> list[str]:
    return ["--cpu-cores", ",".join(map(str, cores))] if cores else []


def _up(args: argparse.Namespace) -> int:
    python = [sys.executable, "-m", "entrypoints.cli"]
    common = ["--device", args.device, "--dtype", args.dtype, "--host", "127.0.0.1", "--log-level", args.log_level]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.enforce_eager:
        common.append("--enforce-eager")
    if args.targets < 1 or args.drafts < 0:
        raise ValueError("--targets must be >= 1 and --drafts >= 0")
    if args.port == 0:
        args.port = _free_port()
    _check_port_free("--port", args.port)
    if args.http_port:
        _check_port_free("--http-port", args.http_port)
    # Workers size their KV pools from the same free memory: give each a share of it.
    target_share, draft_share = 0.3 / args.targets, 0.15 / max(args.drafts, 1)
    if args.draft_method != "model":
        args.draft = args.draft or args.target
    elif args.skip_layers or args.skip_layers_file:
        raise ValueError("--skip-layers needs --draft-method layerskip")
    cores = _split_cores(args.draft is not None)
    target_flag, draft_flag = _cores_flag(cores.target), _cores_flag(cores.others)
    if cores.verify and args.tensor_parallel_size == 1 and not args.threads:
        target_flag += ["--verify-cores", ",".join(map(str, cores.verify))]
    elif cores.verify:  # a fixed thread count or several ranks: the target keeps to its own cores
        target_flag = _cores_flag(cores.verify)
    commands: dict[str, list[str]] = {}
    # the workers compile their forward before they serve: wait for them as long as `up` does
    coordinator = [*python, "coordinator", "--port", str(args.port), "--k", args.k if args.draft else "0",
                   "--connect-timeout", str(args.startup_timeout),
                   "--log-level", args.log_level, "--overlap" if args.overlap else "--no-overlap",
                   *(["--draft-confidence", args.draft_confidence] if args.draft_confidence else []),
                   *(["--overlap-width", args.overlap_width] if args.overlap_width else [])]
    for index in range(args.targets):
        port = _free_port()
        commands[f"target{index}" if args.targets > 1 else "target"] = [
            *python, "target", "--model", args.target, "--port", str(port), *common, "--kv-cache-memory",
            f"{target_share:.3f}", "--tensor-parallel-size", str(args.tensor_parallel_size), *target_flag]
        coordinator += ["--target", f"127.0.0.1:{port}"]
    for index in range(args.drafts if args.draft else 0):
        port = _free_port()
        commands[f"draft{index}" if args.drafts > 1 else "draft"] = [
            *python, "draft", "--model", args.draft, "--port", str(port), *common, "--kv-cache-memory",
            f"{draft_share:.3f}", *_drafter_flags(args), *draft_flag]
        coordinator += ["--draft", f"127.0.0.1:{port}"]
    commands["coordinator"] = coordinator
    if args.http_port:
        commands["gateway"] = [*python, "gateway", "--coordinator", f"127.0.0.1:{args.port}", "--port",
                               str(args.http_port), "--host", "127.0.0.1", "--log-level", args.log_level,
                               "--connect-timeout", str(args.startup_timeout)]
        if args.api_key:
            commands["gateway"] += ["--api-key", args.api_key]
    children = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
    for name in ("coordinator", "gateway") if cores.others else ():  # off the cores the target verifies on
        if name in children:
            os.sched_setaffinity(children[name].pid, cores.others)

    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    address = f"127.0.0.1:{args.port}"
    deadline = time.monotonic() + args.startup_timeout
    ready = False
    code = 0
    try:
        while not stopping:
            exited = {name: child.returncode for name, child in children.items() if child.poll() is not None}
            if exited:
                name, returncode = next(iter(exited.items()))
                print(f"splitspec up: the {name} exited with code {returncode}", file=sys.stderr)
                code = EXIT_FAILURE
                break
            if not ready:
                if _serving(address) and (not args.http_port or _http_ok(args.http_port)):
                    ready = True
                    web = f", HTTP at http://127.0.0.1:{args.http_port}" if args.http_port else ""
                    print(f"splitspec is up: coordinator at {address}{web} (Ctrl-C stops it)", flush=True)
                elif time.monotonic() > deadline:
                    print(f"splitspec up: not healthy after {args.startup_timeout:.0f}s", file=sys.stderr)
                    code = EXIT_FAILURE
                    break
            time.sleep(0.2)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
    return code


# --- generate ---------------------------------------------------------------------------------

_REQUEST_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "k",
                   "stop", "stop_token_ids", "ignore_eos")


def _request_from(fields: dict[str, Any]) -> Any:
    from splitspec.v1 import coordinator_pb2

    unknown = set(fields) - {"prompt", "id", *_REQUEST_FIELDS}
    if unknown:
        raise ValueError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    request = coordinator_pb2.GenerateRequest(prompt=prompt or "")
    for name in _REQUEST_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request, name).extend([value] if isinstance(value, (str, int)) else value)
        else:
            setattr(request, name, value)
    return request


def _summary(responses: list[Any]) -> dict[str, Any]:
    last = responses[-1]
    return {
        "text": "".join(r.text for r in responses),
        "token_ids": [t for r in responses for t in r.token_ids],
        "finish_reason": last.finish_reason,
        "usage": {"prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens},
        "spec": {"rounds": last.spec.rounds, "draft_tokens": last.spec.draft_tokens,
                 "accepted_tokens": last.spec.accepted_tokens},
    }


async def _generate(args: argparse.Namespace) -> int:
    from splitspec.service import make_channel
    from splitspec.v1 import coordinator_pb2_grpc

    defaults = {name: getattr(args, name) for name in _REQUEST_FIELDS}
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.prompts_file}: not JSON lines ({exc})") from exc
        requests = [_request_from({**{k: v for k, v in defaults.items() if v is not None}, **item}) for item in items]
    else:
        if args.prompt is None:
            raise ValueError("give a PROMPT or --prompts-file")
        requests = [_request_from({**defaults, "prompt": args.prompt})]

    async with make_channel(args.coordinator, _tls(args), args.auth_token) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        if not args.prompts_file and not args.json:
            last = None
            async for response in stub.Generate(requests[0], timeout=args.timeout):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                last = response
            sys.stdout.write("\n")
            if last is not None:
                spec = last.spec
                rate = spec.accepted_tokens / spec.draft_tokens if spec.draft_tokens else 0.0
                print(f"[{last.finish_reason}: {last.usage.completion_tokens} tokens, {spec.rounds} rounds, "
                      f"acceptance {rate:.2f}]", file=sys.stderr)
            return 0

        semaphore = asyncio.Semaphore(max(1, args.concurrency))

        async def one(request: Any) -> dict[str, Any]:
            async with semaphore:
                return _summary([r async for r in stub.Generate(request, timeout=args.timeout)])

        tasks = [asyncio.ensure_future(one(request)) for request in requests]
        for task in tasks:  # print in input order, as each is ready
            print(json.dumps(await task), flush=True)
    return 0


async def _stats(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from splitspec.service import make_channel
    from splitspec.v1 import common_pb2, draft_pb2_grpc, target_pb2_grpc

    async with make_channel(args.worker, _tls(args)) as channel:
        try:
            stats = await target_pb2_grpc.TargetWorkerStub(channel).GetStats(common_pb2.StatsRequest(), timeout=10)
            kind = "target"
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            stats = await draft_pb2_grpc.DraftWorkerStub(channel).GetStats(common_pb2.StatsRequest(), timeout=10)
            kind = "draft"
    if args.json:
        fields = MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        fields.update(preemptions=stats.preemptions, steps=stats.steps,  # int64: numbers, not strings
                      steps_by_batch_sequences=list(stats.steps_by_batch_sequences),
                      held_steps=stats.held_steps, late_arrivals=stats.late_arrivals)
        print(json.dumps({"worker": kind, **fields}))
        return 0
    print(f"{kind} worker {args.worker}")
    print(f"  KV blocks      {stats.blocks_used} used / {stats.blocks_free} free / {stats.blocks_total} total "
          f"({stats.utilization:.1%}), {stats.block_size} tokens per block")
    print(f"  sequences      {stats.running_sequences} running, {stats.waiting_requests} waiting, "
          f"{stats.preemptions} preemptions")
    print(f"  prefix cache   {stats.prefix_cache_hit_rate:.1%} of full prompt blocks reused")
    print(f"  batching       {stats.steps} steps, mean {stats.mean_batch_sequences:.2f} sequences / "
          f"{stats.mean_batch_tokens:.1f} tokens per step, max {stats.max_batch_sequences} sequences")
    histogram = ", ".join(f"{n}: {count}" for n, count in enumerate(stats.steps_by_batch_sequences) if n and count)
    if histogram:
        print(f"  steps by batch {histogram} (sequences: steps)")
    if stats.steps:
        print(f"  step time      {stats.step_seconds:.1f} s in steps, {stats.forward_seconds:.1f} s of it in forward passes")
    if stats.held_steps:
        print(f"  holds          {stats.held_steps} batches held {stats.hold_seconds:.2f} s for expected rounds "
              f"(gap {stats.expected_gap_seconds * 1000:.1f} ms), {stats.late_arrivals} came late")
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from entrypoints.bench import BenchSettings, run_bench, table

    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line) for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    try:
        concurrency = [int(c) for c in args.concurrency.split(",")]
        named = [k.strip() for k in args.k.split(",")]
        k_values = sorted({0, *(int(k) for k in named if k != "auto")}) + (["auto"] if "auto" in named else [])
    except ValueError as exc:
        raise ValueError(f"--concurrency/--k take comma-separated integers ({exc})") from exc
    if args.gateway and not args.gateway.startswith(("http://", "https://")):
        raise ValueError(f"--gateway {args.gateway!r}: expected a URL such as http://127.0.0.1:8000")
    settings = BenchSettings(
        coordinator=args.gateway or args.coordinator, prompts=prompts, concurrency=concurrency, k_values=k_values,
        requests=args.requests, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        draft_confidence=args.draft_confidence, output=Path(args.output),
        tls=_tls(args), token=args.auth_token, progress=not args.no_progress, label=args.label)
    report = await run_bench(settings)
    print(table(report))
    print(f"report: {Path(args.output) / 'bench.json'}; plots: {args.output}/tokens_per_s.png, "
          f"generation_time.png, ttft.png")
    return 0


def _search_skip(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitspec.models import load_model
    from splitspec.skip_search import SkipSearchSettings, plot_history, search_skip, write_result

    _set_threads(args.threads)
    with open(args.prompts, encoding="utf-8") as handle:
        try:
            prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.num_prompts]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{args.prompts}: expected JSON lines with a prompt field ({exc})") from exc
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    loaded = load_model(args.model, args.device, args.dtype)
    settings = SkipSearchSettings(prompts=prompts, trials=args.trials, max_skip=args.max_skip,
                                  max_tokens=args.max_tokens, temperature=args.temperature, max_k=args.max_k,
                                  seed=args.seed, progress=not args.no_progress)
    result, study = search_skip(loaded, settings)
    output = Path(args.output)
    write_result(result, output)
    best = result.best
    print(f"best skip set {','.join(map(str, best.skip_layers))} of {result.num_layers} layers: acceptance "
          f"{best.acceptance:.3f}, cost ratio {best.cost_ratio:.3f}, expected speedup {best.expected_speedup:.3f} "
          f"at k={best.k} ({result.completed_trials} trials completed, {result.pruned_trials} pruned)")
    print(f"written: {output}")
    if args.plot is not None:
        plot = Path(args.plot) if args.plot else output.with_suffix(".png")
        plot_history(study, plot)
        print(f"plot: {plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import grpc

    from splitspec.errors import SplitspecError

    try:
        if args.command in ("target", "draft", "coordinator", "gateway"):
            _run_service(args, args.command)
            code = 0
        elif args.command == "up":
            code = _up(args)
        elif args.command == "stats":
            code = asyncio.run(_stats(args))
        elif args.command == "bench":
            code = asyncio.run(_bench(args))
        elif args.command == "search-skip":
            code = _search_skip(args)
        else:
            code = asyncio.run(_generate(args))
    except KeyboardInterrupt:
        code = 130
    except SplitspecError as exc:
        print(f"splitspec {args.command}: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except grpc.RpcError as exc:
        code_name = exc.code().name if hasattr(exc, "code") else "ERROR"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"splitspec {args.command}: {code_name}: {details}", file=sys.stderr)
        code = EXIT_FAILURE
    except (ValueError, OSError) as exc:
        print(f"splitspec {args.command}: {exc}", file=sys.stderr)
        code = EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
