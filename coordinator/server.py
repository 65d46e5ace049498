"""Coordinator process: connect to the workers, refuse an incompatible pair, serve Coordinator."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from coordinator.generation import Backend
from coordinator.metrics import CoordinatorMetrics
from coordinator.request import Limits
from coordinator.servicer import CoordinatorServicer
from coordinator.workers import DraftClient, TargetClient, wait_until_serving
from splitspec.errors import IncompatibleModels, InvalidArgument
from splitspec.models import load_tokenizer, tokenizer_fingerprint
from splitspec.service import RunningServer, registration, serve_until_signal, start_server
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CoordinatorConfig:
    target: str
    draft: str | None = None
    port: int = 50051
    host: str = "0.0.0.0"
    k: int = 4
    max_k: int = 16
    tokenizer: str | None = None
    connect_timeout: float = 120.0
    metrics_port: int | None = None
    grace: float = 10.0


def check_compatible(target: common_pb2.ModelInfo, draft: common_pb2.ModelInfo) -> None:
    """Refuse a pair whose distributions are not over the same tokens."""
    if target.vocab_size != draft.vocab_size or target.tokenizer_fingerprint != draft.tokenizer_fingerprint:
        raise IncompatibleModels(
            f"draft {draft.model} (vocab_size {draft.vocab_size}, tokenizer {draft.tokenizer_fingerprint}) does not "
            f"match target {target.model} (vocab_size {target.vocab_size}, tokenizer {target.tokenizer_fingerprint}); "
            "speculative decoding needs one shared vocabulary"
        )


async def start_coordinator(config: CoordinatorConfig) -> RunningServer:
    if not 0 <= config.k <= config.max_k:
        raise InvalidArgument("--k", f"must be in [0, --max-k={config.max_k}], got {config.k}")
    target = TargetClient(config.target)
    draft = DraftClient(config.draft) if config.draft else None
    await wait_until_serving(target.channel, config.target, config.connect_timeout)
    target_info = await target.info()
    draft_info = None
    max_k = config.max_k
    if draft is not None:
        await wait_until_serving(draft.channel, draft.address, config.connect_timeout)
        draft_info = await draft.info()
        check_compatible(target_info, draft_info)
        max_k = min(max_k, draft_info.max_k)
    tokenizer_name = config.tokenizer or target_info.model
    tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_name)
    if tokenizer_fingerprint(tokenizer) != target_info.tokenizer_fingerprint:
        raise IncompatibleModels(
            f"tokenizer {tokenizer_name} ({tokenizer_fingerprint(tokenizer)}) does not match the target's "
            f"({target_info.tokenizer_fingerprint})"
        )
    metrics = CoordinatorMetrics()
    backend = Backend(
        target=target,
        draft=draft,
        draft_max_len=draft_info.max_model_len if draft_info else 0,
        eos_token_ids=frozenset(target_info.eos_token_ids),
        tokenizer=tokenizer,
        metrics=metrics,
    )
    limits = Limits(
        max_model_len=target_info.max_model_len,
        vocab_size=target_info.vocab_size,
        default_k=min(config.k, max_k) if draft else 0,
        max_k=max_k if draft else 0,
    )
    register = registration(
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
        CoordinatorServicer(backend, limits, target_info, draft_info),
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    )
    running = await start_server(register, config.port, config.host, metrics.registry, backend)
    log.info("coordinator serving", extra={"port": running.port, "target": config.target, "draft": config.draft,
                                           "k": limits.default_k})
    return running


async def serve_coordinator(config: CoordinatorConfig) -> None:
    running = await start_coordinator(config)
    await serve_until_signal(running, config.grace, config.metrics_port)
    await running.state.drain()
