"""Settings every model-serving worker shares; each worker's config extends this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
