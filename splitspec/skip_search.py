"""`splitspec search-skip`: Bayesian search (Optuna TPE) for the layers a self-speculative draft skips.

The reference is computed once: the target's own continuation of each prompt (greedy, or sampled
at --temperature) and its processed distribution p at every generated position. A trial drops a
skip set, runs the remaining layers over the same sequences (one teacher-forced forward pass per
prompt) and measures
- alpha, the expected acceptance per drafted token: the mean over positions of sum(min(p, q))
  (Leviathan et al. 2023); greedy p and q are one-hot, so this is the argmax agreement;
- c, the draft's cost per decoding step over the target's, timed on single-token steps with a KV cache.
Its score is the expected speedup (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)) at the best k <= --max-k.
The running score is reported after every prompt and Optuna's median pruner stops trailing trials;
skip sets over --max-skip are pruned before any work.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitspec.layerskip import decoder_layers, layers_skipped
from splitspec.models import LoadedModel
from splitspec.sampling import SamplingParams, process_logits

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SkipSearchSettings:
    prompts: list[str]
    trials: int = 40
    max_skip: int | None = None     # default: all layers but one
    max_tokens: int = 64            # reference continuation length per prompt
    temperature: float = 0.0
    max_k: int = 8
    seed: int = 0
    timing_steps: int = 16
    progress: bool = True


@dataclass(slots=True)
class Reference:
    sequences: list[torch.Tensor]     # [prompt + generated] token ids per prompt
    prompt_lengths: list[int]
    target_probs: list[torch.Tensor]  # [generated, vocab] processed p per prompt


@dataclass(slots=True)
class Measurement:
    skip_layers: list[int]
    acceptance: float
    cost_ratio: float
    k: int
    expected_speedup: float
    draft_step_seconds: float


@dataclass(slots=True)
class SkipSearchResult:
    model: str
    num_layers: int
    best: Measurement
    target_step_seconds: float
    temperature: float
    prompts: int
    max_tokens: int
    trials: int
    completed_trials: int
    pruned_trials: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        best = data.pop("best")
        return {**best, **data}  # skip_layers at the top level: what --skip-layers-file reads


def expected_speedup(alpha: float, cost_ratio: float, max_k: int) -> tuple[float, int]:
    """Leviathan et al.'s walltime improvement at the best k in 1..max_k: (speedup, k)."""
    best = (0.0, 1)
    for k in range(1, max_k + 1):
        tokens = k + 1 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
        best = max(best, (tokens / (k * cost_ratio + 1), k), key=lambda item: item[0])
    return best


def build_reference(loaded: LoadedModel, prompts: list[str], settings: SkipSearchSettings) -> Reference:
    from transformers import GenerationConfig

    params = SamplingParams(temperature=settings.temperature)
    sampled = settings.temperature > 0
    config = GenerationConfig(max_new_tokens=settings.max_tokens, do_sample=sampled, pad_token_id=0,
                              eos_token_id=None, **({"temperature": settings.temperature, "top_k": 0} if sampled else {}))
    torch.manual_seed(settings.seed)
    reference = Reference([], [], [])
    with torch.inference_mode():
        for prompt in prompts:
            ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(loaded.device)
            sequence = loaded.model.generate(ids, generation_config=config)[0]
            reference.sequences.append(sequence)
            reference.prompt_lengths.append(ids.shape[1])
            reference.target_probs.append(_processed(loaded.model, sequence, ids.shape[1], params))
    return reference


def _processed(model: Any, sequence: torch.Tensor, prompt_length: int, params: SamplingParams) -> torch.Tensor:
    """Processed next-token distributions at each generated position: [generated, vocab]."""
    logits = model(sequence.unsqueeze(0)).logits[0, prompt_length - 1 : -1].float().cpu()
    return process_logits(logits, params, None)


def acceptance(model: Any, reference: Reference, index: int, params: SamplingParams) -> torch.Tensor:
    """Per generated position of prompt `index`: sum(min(p, q)) for the model as it is now."""
    q = _processed(model, reference.sequences[index], reference.prompt_lengths[index], params)
    return torch.minimum(reference.target_probs[index], q).sum(dim=-1)


def step_seconds(model: Any, device: torch.device, steps: int, repeats: int = 3) -> float:
    """Seconds per single-token decoding step after a 32-token prefill (best of `repeats`)."""
    from transformers import DynamicCache

    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            prompt = torch.arange(3, 35, device=device).unsqueeze(0)
            out = model(prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            best = min(best, (time.perf_counter() - start) / steps)
    return best


def search_skip(loaded: LoadedModel, settings: SkipSearchSettings) -> tuple[SkipSearchResult, Any]:
    """Run the study; returns the result and the Optuna study (for plotting)."""
    import optuna

    num_layers = len(decoder_layers(loaded.model))
    max_skip = settings.max_skip if settings.max_skip is not None else num_layers - 1
    if not 1 <= max_skip < num_layers:
        raise ValueError(f"--max-skip must be in [1, {num_layers - 1}] for a {num_layers}-layer model, got {max_skip}")
    if settings.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {settings.trials}")
    params = SamplingParams(temperature=settings.temperature)
    reference = build_reference(loaded, settings.prompts, settings)
    target_cost = step_seconds(loaded.model, loaded.device, settings.timing_steps)
    measured: dict[tuple[int, ...], Measurement] = {}

    def objective(trial: optuna.Trial) -> float:
        skip = tuple(i for i in range(num_layers) if trial.suggest_categorical(f"skip_{i}", [False, True]))
        trial.set_user_attr("skip_layers", list(skip))
        if not 1 <= len(skip) <= max_skip:
            raise optuna.TrialPruned(f"skips {len(skip)} layers (allowed 1..{max_skip})")
        if skip in measured:
            return _record(trial, measured[skip])
        with layers_skipped(loaded.model, skip) as model:
            draft_cost = step_seconds(model, loaded.device, settings.timing_steps)
            ratio = draft_cost / target_cost
            rows: list[torch.Tensor] = []
            for index in range(len(reference.sequences)):
                with torch.inference_mode():
                    rows.append(acceptance(model, reference, index, params))
                alpha = float(torch.cat(rows).mean())
                trial.report(expected_speedup(alpha, ratio, settings.max_k)[0], index)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"expected speedup trails after {index + 1} prompts")
        speedup, k = expected_speedup(alpha, ratio, settings.max_k)
        measured[skip] = Measurement(list(skip), alpha, ratio, k, speedup, draft_cost)
        return _record(trial, measured[skip])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )
    study.optimize(objective, n_trials=settings.trials, show_progress_bar=settings.progress)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise ValueError(f"no trial completed in {settings.trials}: raise --trials or --max-skip")
    best = measured[tuple(study.best_trial.user_attrs["skip_layers"])]
    history = [{"number": t.number, "skip_layers": t.user_attrs.get("skip_layers"), "state": t.state.name.lower(),
                "expected_speedup": t.value, "acceptance": t.user_attrs.get("acceptance"),
                "cost_ratio": t.user_attrs.get("cost_ratio")} for t in study.trials]
    result = SkipSearchResult(
        model=loaded.name, num_layers=num_layers, best=best, target_step_seconds=target_cost,
        temperature=settings.temperature, prompts=len(settings.prompts), max_tokens=settings.max_tokens,
        trials=len(study.trials), completed_trials=len(completed),
        pruned_trials=sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials), history=history,
    )
    return result, study


def _record(trial: Any, measurement: Measurement) -> float:
    trial.set_user_attr("acceptance", measurement.acceptance)
    trial.set_user_attr("cost_ratio", measurement.cost_ratio)
    trial.set_user_attr("k", measurement.k)
    return measurement.expected_speedup


def write_result(result: SkipSearchResult, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result.to_json(), indent=2) + "\n")


def plot_history(study: Any, path: Path) -> None:
    """The optimisation history (score per trial and best so far) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(study)
    axes.set_ylabel("expected speedup")
    axes.set_title("search-skip: expected speedup per trial")
    path.parent.mkdir(parents=True, exist_ok=True)
    axes.figure.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(axes.figure)
