"""Model and tokenizer loading with `transformers`, device/dtype resolution, and ModelInfo.

A local directory is checked up front so that a malformed one fails with a message naming the
path and what is missing; anything else is treated as a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitspec.errors import ModelLoadError
from splitspec.v1 import common_pb2

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: Any          # a transformers PreTrainedModel in eval mode
    tokenizer: Any      # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    fingerprint: str

    def info(self, max_k: int = 0) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model=self.name,
            architecture=(self.model.config.architectures or [type(self.model).__name__])[0],
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            tokenizer_fingerprint=self.fingerprint,
            eos_token_ids=list(self.eos_token_ids),
            bos_token_id=self.bos_token_id,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            max_k=max_k,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def check_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming `path` and every file that a loadable model needs but lacks."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory")
    missing = []
    config = path / "config.json"
    if not config.is_file():
        missing.append("config.json")
    else:
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model path {path}: config.json is not valid JSON ({exc})") from exc
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if missing:
        raise ModelLoadError(f"model path {path} is missing {', '.join(missing)}")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary (token -> id) and the special token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    payload = json.dumps({"vocab": vocab, "special": specials}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"tokenizer path {path} is not a directory")
        if not any((path / file).is_file() for file in _TOKENIZER_FILES):
            raise ModelLoadError(f"tokenizer path {path} is missing tokenizer.json, tokenizer.model or vocab.json")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer {name}: {exc}") from exc


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_model(name: str, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(name).expanduser()
    local = path.exists() or name.startswith((".", "/", "~"))
    if local:
        check_model_dir(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = str(path) if local else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {exc}") from exc
    model.to(torch_device).eval()
    tokenizer = load_tokenizer(source)
    config = model.config
    model_len = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    if max_model_len:
        if max_model_len > model_len:
            raise ModelLoadError(f"--max-model-len {max_model_len} exceeds the model's {model_len} positions")
        model_len = max_model_len
    bos = tokenizer.bos_token_id
    loaded = LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        max_model_len=model_len,
        eos_token_ids=_eos_ids(model, tokenizer),
        bos_token_id=-1 if bos is None else int(bos),
        fingerprint=tokenizer_fingerprint(tokenizer),
    )
    log.info(
        "model loaded",
        extra={"model": name, "device": str(torch_device), "dtype": str(torch_dtype), "vocab": loaded.vocab_size,
               "max_model_len": model_len, "pid": os.getpid()},
    )
    return loaded
