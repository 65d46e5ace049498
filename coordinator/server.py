"""Coordinator process: connect to the workers, refuse an incompatible pair, serve Coordinator."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from coordinator.adaptive import AUTO_K
from coordinator.admission import Admission
from coordinator.backend import Backend, Timeouts
from coordinator.metrics import AutoKCollector, CoordinatorMetrics
from coordinator.pool import WorkerPool
from coordinator.request import Limits
from coordinator.servicer import CoordinatorServicer
from coordinator.workers import DraftClient, TargetClient, wait_until_serving
from splitspec.errors import IncompatibleModels, InvalidArgument
from splitspec.constraints import GrammarCompiler
from splitspec.models import first_token_difference, load_tokenizer, tokenizer_fingerprint
from splitspec.sampling import check_confidence
from splitspec.security import TokenInterceptor
from splitspec.service import RunningServer, ServerSecurity, registration, serve_until_signal, start_server
from splitspec.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CoordinatorConfig:
    target: str | list[str]                  # HOST:PORT, repeatable; a name may resolve to many replicas
    draft: str | list[str] | None = None
    port: int = 50051
    host: str = "0.0.0.0"
    k: int = 4
    max_k: int = 16
    tokenizer: str | None = None
    connect_timeout: float = 120.0
    metrics_port: int | None = None
    grace: float = 10.0
    target_timeout: float = 30.0
    draft_timeout: float = 5.0
    max_running_requests: int = 512
    max_queued_requests: int = 1024
    health_interval: float = 1.0
    tls: Any = None                  # TLSConfig: serves TLS, and mTLS towards the workers
    auth_token: str | None = None    # bearer token required on the Coordinator service
    reflection: bool = False
    overlap: bool = False            # draft round n+1 while round n is verified
    overlap_width: int = 3           # candidate tokens per accept length that overlap drafts for
    draft_confidence: float = 0.0    # default per-request stop threshold of proposals (0: k tokens)

    @property
    def targets(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @property
    def drafts(self) -> list[str]:
        if not self.draft:
            return []
        return [self.draft] if isinstance(self.draft, str) else list(self.draft)


def check_compatible(target: common_pb2.ModelInfo, draft: common_pb2.ModelInfo, difference: str | None = None) -> None:
    """Refuse a pair whose distributions are not over the same tokens. Both vocab sizes already
    exclude embedding rows past the tokenizer's vocabulary (see splitspec.models.vocabulary_size),
    so a padded pair over one tokenizer passes."""
    if target.vocab_size != draft.vocab_size or target.tokenizer_fingerprint != draft.tokenizer_fingerprint:
        raise IncompatibleModels(
            f"draft {draft.model} (vocab_size {draft.vocab_size}, tokenizer {draft.tokenizer_fingerprint}) does not "
            f"match target {target.model} (vocab_size {target.vocab_size}, tokenizer {target.tokenizer_fingerprint})"
            + (f"; first differing token: {difference}" if difference else "")
            + "; speculative decoding needs one shared tokenizer"
        )


async def _tokenizer_difference(target_tokenizer: Any, draft: common_pb2.ModelInfo) -> str | None:
    """The first token where the draft's tokenizer differs, when this host can load it."""
    try:
        draft_tokenizer = await asyncio.to_thread(load_tokenizer, draft.model)
    except Exception:  # noqa: BLE001 - the draft's model may live only on its own host
        return None
    return first_token_difference(target_tokenizer, draft_tokenizer)


def _same_vocabulary(reference: common_pb2.ModelInfo) -> Callable[[common_pb2.ModelInfo], None]:
    def check(info: common_pb2.ModelInfo) -> None:
        check_compatible(reference, info)

    return check


async def start_coordinator(config: CoordinatorConfig) -> RunningServer:
    if config.k != AUTO_K and not 0 <= config.k <= config.max_k:
        raise InvalidArgument("--k", f"must be 'auto' or in [0, --max-k={config.max_k}], got {config.k}")
    check_confidence("--draft-confidence", config.draft_confidence)
    if config.overlap_width < 1:
        raise InvalidArgument("--overlap-width", f"must be >= 1, got {config.overlap_width}")
    targets = WorkerPool("target", config.targets, partial(TargetClient, tls=config.tls),
                         refresh_seconds=config.health_interval)
    await targets.start()
    first_target = await targets.wait_for_one(config.connect_timeout)
    target_info = first_target.info or await first_target.client.info()
    targets.check_info = _same_vocabulary(target_info)
    tokenizer_name = config.tokenizer or target_info.model
    tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_name)
    if tokenizer_fingerprint(tokenizer) != target_info.tokenizer_fingerprint:
        raise IncompatibleModels(
            f"tokenizer {tokenizer_name} ({tokenizer_fingerprint(tokenizer)}) does not match the target's "
            f"({target_info.tokenizer_fingerprint})"
        )
    drafts, draft_info, max_k = None, None, config.max_k
    if config.drafts:
        drafts = WorkerPool("draft", config.drafts, partial(DraftClient, tls=config.tls),
                            refresh_seconds=config.health_interval)
        await drafts.refresh()
        # The first draft decides at start-up: an incompatible pair is refused with both fingerprints.
        probe = DraftClient(drafts.endpoints and next(iter(drafts.endpoints)) or config.drafts[0], config.tls)
        try:
            await wait_until_serving(probe.channel, probe.address, config.connect_timeout)
            draft_info = await probe.info()
        finally:
            await probe.close()
        difference = None
        if draft_info.tokenizer_fingerprint != target_info.tokenizer_fingerprint:
            difference = await _tokenizer_difference(tokenizer, draft_info)
        check_compatible(target_info, draft_info, difference)
        drafts.check_info = _same_vocabulary(target_info)
        await drafts.start()
        max_k = min(max_k, draft_info.max_k)
    metrics = CoordinatorMetrics()
    backend = Backend(
        targets=targets,
        drafts=drafts,
        eos_token_ids=frozenset(target_info.eos_token_ids),
        tokenizer=tokenizer,
        metrics=metrics,
        timeouts=Timeouts(target=config.target_timeout, draft=config.draft_timeout),
        max_k=max_k,
        overlap=config.overlap,
        overlap_width=config.overlap_width,
        grammars=GrammarCompiler(tokenizer, target_info.vocab_size, tuple(target_info.eos_token_ids)),
    )
    metrics.registry.register(AutoKCollector(backend.costs))
    limits = Limits(
        max_model_len=target_info.max_model_len,
        vocab_size=target_info.vocab_size,
        default_k=(config.k if config.k == AUTO_K else min(config.k, max_k)) if drafts else 0,
        max_k=max_k if drafts else 0,
        default_draft_confidence=config.draft_confidence,
        eos_token_ids=frozenset(target_info.eos_token_ids),
    )
    admission = Admission(config.max_running_requests, config.max_queued_requests)
    register = registration(
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server,
        CoordinatorServicer(backend, limits, target_info, draft_info, admission),
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    )
    protected = "/" + coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name + "/"
    security = ServerSecurity(
        tls=config.tls, reflection=config.reflection,
        interceptors=(TokenInterceptor(config.auth_token, protected),) if config.auth_token else (),
    )
    running = await start_server(register, config.port, config.host, metrics.registry, backend, security=security)
    running.on_stop_async.append(backend.drain)  # let in-flight Release calls land before channels close
    running.on_stop_async.append(targets.stop)
    if drafts is not None:
        running.on_stop_async.append(drafts.stop)
    log.info("coordinator serving", extra={"port": running.port, "targets": config.targets, "drafts": config.drafts,
                                           "k": limits.default_k})
    return running


async def serve_coordinator(config: CoordinatorConfig) -> None:
    running = await start_coordinator(config)
    await serve_until_signal(running, config.grace, config.metrics_port)
