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
    model: Any          # a transformers PreTrainedModel in eval mode; None for model-free drafters (ngram)
    tokenizer: Any      # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    fingerprint: str
    architecture: str

    def info(self, max_k: int = 0) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            model=self.name,
            architecture=self.architecture,
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


def check_model_dir(path: Path, need_weights: bool = True) -> None:
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
    if need_weights and not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
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


def first_token_difference(first: Any, second: Any) -> str | None:
    """Where two tokenizers' vocabularies first disagree ("id 7: 'a' vs 'b'"), or None."""
    ids_first = {i: token for token, i in first.get_vocab().items()}
    ids_second = {i: token for token, i in second.get_vocab().items()}
    for token_id in sorted(ids_first.keys() | ids_second.keys()):
        a, b = ids_first.get(token_id), ids_second.get(token_id)
        if a != b:
            return f"id {token_id}: {a!r} vs {b!r}"
    return None


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


def _eos_ids(config: Any, generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.extend(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def vocabulary_size(tokenizer: Any, rows: int) -> int:
    """The ids a model serves: those its tokenizer defines and its LM head scores. Embedding rows
    past the tokenizer's vocabulary (padding to a multiple, as Qwen2.5 7B has 152064 rows for 151665
    tokens) are no tokens: they get probability 0, so two models with one tokenizer share a support."""
    return min(len(tokenizer), rows)


def drop_padded_rows(model: Any, vocab_size: int) -> None:
    """Keep the first `vocab_size` rows of the LM head (a view: a tied embedding is not copied),
    so every forward pass scores exactly the served ids."""
    head = model.get_output_embeddings()
    rows = head.weight.shape[0]
    if rows == vocab_size:
        return
    head.weight = torch.nn.Parameter(head.weight[:vocab_size], requires_grad=False)
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias[:vocab_size], requires_grad=False)
    head.out_features = vocab_size
    log.info("lm head padding dropped", extra={"rows": rows, "vocab": vocab_size})


def model_source(name: str, need_weights: bool) -> str:
    """A checked local directory, or `name` as a hub id."""
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        check_model_dir(path, need_weights)
        return str(path)
    return name


def _context_length(config: Any, tokenizer: Any, max_model_len: int | None) -> int:
    model_len = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    if max_model_len:
        if max_model_len > model_len:
            raise ModelLoadError(f"--max-model-len {max_model_len} exceeds the model's {model_len} positions")
        model_len = max_model_len
    return model_len


def _loaded(name: str, model: Any, config: Any, generation_config: Any, tokenizer: Any, vocab_size: int,
            device: torch.device, dtype: torch.dtype, max_model_len: int | None) -> LoadedModel:
    bos = tokenizer.bos_token_id
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        vocab_size=vocab_size,
        max_model_len=_context_length(config, tokenizer, max_model_len),
        eos_token_ids=_eos_ids(config, generation_config, tokenizer),
        bos_token_id=-1 if bos is None else int(bos),
        fingerprint=tokenizer_fingerprint(tokenizer),
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
    )


def load_vocabulary(name: str, max_model_len: int | None = None) -> LoadedModel:
    """A model's config and tokenizer without its weights (model=None): what a model-free drafter
    needs to serve the target's vocabulary, context and fingerprint."""
    from transformers import AutoConfig, GenerationConfig

    source = model_source(name, need_weights=False)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the config of {name}: {exc}") from exc
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        generation_config = None
    tokenizer = load_tokenizer(source)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = vocabulary_size(tokenizer, int(text_config.vocab_size))
    return _loaded(name, None, text_config, generation_config, tokenizer, vocab_size,
                   torch.device("cpu"), torch.float32, max_model_len)


def load_model(name: str, device: str = "auto", dtype: str = "auto", max_model_len: int | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local directory or a hub id."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = model_source(name, need_weights=True)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {exc}") from exc
    model.to(torch_device).eval()
    tokenizer = load_tokenizer(source)
    vocab_size = vocabulary_size(tokenizer, int(model.get_output_embeddings().weight.shape[0]))
    drop_padded_rows(model, vocab_size)
    loaded = _loaded(name, model, model.config, getattr(model, "generation_config", None), tokenizer, vocab_size,
                     torch_device, torch_dtype, max_model_len)
    log.info(
        "model loaded",
        extra={"model": name, "device": str(torch_device), "dtype": str(torch_dtype), "vocab": loaded.vocab_size,
               "max_model_len": loaded.max_model_len, "pid": os.getpid()},
    )
    return loaded
