"""lm-evaluation-harness against a running splitspec, as an evaluation user runs it: its
`local-completions` model gives the same loglikelihoods as its `hf` model on the same target
(within 1e-3 per item) and the same greedy generations, with requests sent as token ids
(`tokenized_requests=True`) and as text. The tasks are the project's own
(`benchmarks/lm_eval/`): TinyStories multiple choice (echo + logprobs requests) and a short
generate-until task (stop strings); no hub download."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import API_KEY, MODEL, start_gateway, stop_gateway
from tests.support import real_model_dir, start_stack

REPO = Path(__file__).resolve().parents[2]
TASKS = ["splitspec_tinystories_mc", "splitspec_tinystories_gen"]
TOLERANCE = 1e-3


def evaluate(model: str, model_args: str, batch_size: int) -> dict[str, dict[int, Any]]:
    """Per task, per document: the loglikelihoods of its choices, or its generation."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(REPO / "benchmarks" / "lm_eval")))
    items: dict[str, dict[int, Any]] = {}
    for task, samples in result["samples"].items():
        if task.endswith("_mc"):
            items[task] = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in samples}
        else:
            items[task] = {s["doc_id"]: s["resps"][0][0] for s in samples}
    items["results"] = result["results"]
    return items


@pytest.fixture(scope="module")
def target_dir() -> Path:
    return real_model_dir() / "tinystories-260k"


@pytest.fixture(scope="module")
def references(target_dir: Path) -> dict[bool, dict[str, dict[int, Any]]]:
    """lm-eval's `hf` model on the target alone, with and without a BOS before each context."""
    return {bos: evaluate("hf", f"pretrained={target_dir},dtype=float32,add_bos_token={bos}", batch_size=1)
            for bos in (True, False)}


# (requests as token ids, lm-eval's tokenizer): its own copy of the target's (with BOS, which
# text requests need), or the server's through /tokenizer_info, /tokenize and /detokenize
# (lm-eval's default when the server has them; that one adds no BOS)
SETTINGS = [(True, "local"), (False, "local"), (True, "remote")]


@pytest.mark.real_models
@pytest.mark.parametrize("tokenized,tokenizer", SETTINGS, ids=["token-ids", "text", "token-ids-remote-tokenizer"])
async def test_local_completions_match_the_hf_model(real, target_dir, references, tokenized, tokenizer, monkeypatch):
    monkeypatch.chdir(REPO)  # the tasks' data files are relative to the repository root
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stack = await start_stack(real["target"], real["draft"], k=4, max_k=8)
    server, task, url = await start_gateway(stack.coordinator.address, real["target"].tokenizer,
                                            max_model_len=real["target"].max_model_len)
    bos = tokenizer == "local"
    reference = references[bos]
    try:
        args = f"model={MODEL},base_url={url}/v1/completions,tokenized_requests={tokenized},max_retries=1"
        if tokenizer == "local":
            args += f",tokenizer={target_dir},tokenizer_backend=huggingface,add_bos_token=True"
        else:
            args += f",auth_token={API_KEY}"  # the gateway's key guards its tokenizer routes too
        served = await asyncio.to_thread(evaluate, "local-completions", args, 4)
    finally:
        await stop_gateway(server, task)
        await stack.stop()
    mc, gen = TASKS
    assert served[mc].keys() == reference[mc].keys() and len(served[mc]) == 12
    worst = 0.0
    for doc, expected in reference[mc].items():
        assert len(served[mc][doc]) == len(expected)
        for got, want in zip(served[mc][doc], expected):
            assert got == pytest.approx(want, abs=TOLERANCE), (doc, served[mc][doc], expected)
            worst = max(worst, abs(got - want))
    # The same greedy generations, document by document. The hf model decodes the new tokens on
    # their own, and SentencePiece drops the first one's leading space there; the server's text
    # continues the prompt, with the space (as vLLM's does).
    assert served[gen].keys() == reference[gen].keys() and len(served[gen]) == 6
    for doc, expected in reference[gen].items():
        assert served[gen][doc] in (expected, " " + expected), doc
    assert served["results"][gen] == reference["results"][gen]
    assert served["results"][mc]["acc,none"] == reference["results"][mc]["acc,none"]
    print(f"tokenized_requests={tokenized}, {tokenizer} tokenizer: {sum(map(len, reference[mc].values()))} loglikelihoods, "
          f"largest difference {worst:.2e}; generations {served[gen]}")
