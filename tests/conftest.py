"""Session fixtures: tiny random models (built once) and loaded model handles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitspec.models import LoadedModel, load_model
from tests.support import (FAMILIES, byte_level_bpe_tokenizer, real_model_dir, save_padded_copy, save_tiny_llama,
                           save_tiny_model, start_stack)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """target; draft_same (identical weights); draft_noisy (perturbed); draft_close (slightly
    perturbed: agrees with the target often, not always); draft_other (independent);
    draft_short (perturbed, 40-position context); draft_wide (another tokenizer: byte-level BPE,
    300 rows); target_padded (the target with 320 embedding rows for the 259 tokens)."""
    root = tmp_path_factory.mktemp("tiny")
    target = save_tiny_llama(root / "target", seed=0)
    dirs = {
        "target": target,
        "draft_same": save_tiny_llama(root / "draft_same", seed=1, base=target),
        "draft_noisy": save_tiny_llama(root / "draft_noisy", seed=2, base=target, noise=0.35),
        "draft_close": save_tiny_llama(root / "draft_close", seed=6, base=target, noise=0.1),
        "draft_other": save_tiny_llama(root / "draft_other", seed=3),
        "draft_short": save_tiny_llama(root / "draft_short", seed=4, base=target, noise=0.35, max_positions=40),
        "draft_wide": save_tiny_llama(root / "draft_wide", seed=5, vocab_size=300),
        "target_padded": save_padded_copy(target, root / "target_padded", rows=320),
    }
    byte_level_bpe_tokenizer().save_pretrained(dirs["draft_wide"])
    return dirs


@pytest.fixture(scope="session")
def tiny(tiny_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_model(str(path), device="cpu", dtype="float32") for name, path in tiny_dirs.items()}


@pytest.fixture
def fresh(tiny_dirs: dict[str, Path]):
    """Loads a tiny model anew: compile tests count the graphs built for their own model object
    (torch.compile reuses graphs compiled for the session's shared copies)."""
    return lambda name: load_model(str(tiny_dirs[name]), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
async def compiled_stack(tiny_dirs: dict[str, Path]):
    """One stack whose two workers run compiled (the target and draft_noisy, loaded anew): a graph
    takes 15-20 s to compile here, so the compiled end-to-end tests share these four."""
    load = lambda name: load_model(str(tiny_dirs[name]), device="cpu", dtype="float32")  # noqa: E731
    stack = await start_stack(load("target"), load("draft_noisy"), k=4, max_k=8, compile=True)
    yield stack
    await stack.stop()


@pytest.fixture(scope="session")
def real() -> dict[str, LoadedModel]:
    root = real_model_dir()
    return {
        "target": load_model(str(root / "tinystories-260k"), device="cpu", dtype="float32"),
        "draft": load_model(str(root / "tinystories-xs"), device="cpu", dtype="float32"),
    }


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (target, draft): the draft is the target's weights plus noise."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILIES:
        target = save_tiny_model(root / family, family, seed=0)
        dirs[family] = (target, save_tiny_model(root / f"{family}-draft", family, seed=1, base=target, noise=0.2))
    return dirs
