"""Settings every model-serving worker shares; each worker's config extends this."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class WorkerConfig:
    model: str
    port: int
    host: str = "0.0.0.0"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    metrics_port: int | None = None
    grace: float = 10.0
    watchdog_seconds: float = 60.0
    tls: Any = None          # splitspec.security.TLSConfig
    reflection: bool = False
    model_nice: int = 0      # --model-nice: the model thread's priority below the I/O threads
    enforce_eager: bool = False  # --enforce-eager: no torch.compile of the forward

    def compiles(self, loaded: Any) -> bool:
        """Whether this worker compiles the forward of `loaded` (a LoadedModel): unless
        --enforce-eager, wherever compiled is faster (`compiles_faster`)."""
        from splitspec.paged.compiled import compiles_faster

        if self.enforce_eager:
            return False
        if not compiles_faster(loaded.device, loaded.dtype):
            log.info("forward runs eagerly: compiled graphs are slower on this device in this dtype",
                     extra={"device": str(loaded.device), "dtype": str(loaded.dtype)})
            return False
        return True
