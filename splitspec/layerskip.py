"""Self-speculative drafting (Draft & Verify, LayerSkip): the target with some decoder layers skipped.

The draft keeps the target's embedding, final norm and LM head, and runs a subset of its decoder
layers in their original order. Kept layers are renumbered so that KV caches (the paged pool, or a
Hugging Face cache) hold exactly one entry per kept layer.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from splitspec.errors import InvalidArgument, ModelLoadError


def parse_skip_layers(text: str) -> list[int]:
    """'3,5,7' or '2-4,9' -> sorted layer indices."""
    layers: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            start, _, end = part.partition("-")
            layers.update(range(int(start), int(end or start) + 1))
    except ValueError as exc:
        raise InvalidArgument("--skip-layers", f"expected comma-separated layer indices like 3,5,7, got {text!r}") \
            from exc
    return sorted(layers)


def read_skip_file(path: str) -> list[int]:
    """The `skip_layers` list of a JSON file written by `splitspec search-skip`."""
    try:
        data = json.loads(Path(path).read_text())
        layers = data["skip_layers"]
        if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
            raise TypeError("skip_layers must be a list of integers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("--skip-layers-file", f"{path}: no valid skip_layers list ({exc})") from exc
    return sorted(set(layers))


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder stack of a Hugging Face causal LM (Llama, Mistral, Qwen, ... : model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelLoadError(f"{type(model).__name__} has no model.layers decoder stack: layer skipping needs one")
    return layers


def check_skip(skip: Sequence[int], num_layers: int) -> None:
    outside = [i for i in skip if not 0 <= i < num_layers]
    if outside:
        raise InvalidArgument("--skip-layers", f"layers {outside} do not exist (the model has {num_layers}: "
                                               f"0..{num_layers - 1})")
    if len(set(skip)) >= num_layers:
        raise InvalidArgument("--skip-layers", f"skipping all {num_layers} layers leaves no model")


def _use_layers(model: Any, layers: list[torch.nn.Module], layer_types: list[str] | None) -> None:
    for index, layer in enumerate(layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = index
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if layer_types is not None:
        model.config.layer_types = layer_types


def skip_layers(model: Any, skip: Sequence[int]) -> None:
    """Drop the decoder layers in `skip` from `model`, in place."""
    layers = list(decoder_layers(model))
    check_skip(skip, len(layers))
    types = getattr(model.config, "layer_types", None)
    keep = [i for i in range(len(layers)) if i not in set(skip)]
    _use_layers(model, [layers[i] for i in keep], [types[i] for i in keep] if types else None)


@contextmanager
def layers_skipped(model: Any, skip: Sequence[int]) -> Iterator[Any]:
    """`model` with `skip` dropped inside the block, whole again after it."""
    layers = list(decoder_layers(model))
    types = getattr(model.config, "layer_types", None)
    types = list(types) if types else None
    skip_layers(model, skip)
    try:
        yield model
    finally:
        _use_layers(model, layers, types)
