"""search-skip: the speedup formula, the acceptance measure, and a short search end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from splitspec.models import load_model
from splitspec.sampling import SamplingParams
from splitspec.skip_search import (
    SkipSearchSettings,
    acceptance,
    build_reference,
    expected_speedup,
    search_skip,
    write_result,
)
from tests.support import real_model_dir


def test_expected_speedup_is_leviathans_formula_at_the_best_k():
    assert expected_speedup(0.0, 0.5, 8) == (pytest.approx(1 / 1.5), 1)
    speedup, k = expected_speedup(0.8, 0.1, 8)
    by_k = {j: (1 - 0.8 ** (j + 1)) / (0.2 * (0.1 * j + 1)) for j in range(1, 9)}
    assert k == max(by_k, key=by_k.get) == 6 and speedup == pytest.approx(by_k[6])
    assert expected_speedup(1.0, 0.25, 4) == (pytest.approx(5 / 2), 4)


def test_acceptance_is_one_for_the_target_itself_and_below_for_a_cut_model(tiny):
    from splitspec.layerskip import layers_skipped

    target = tiny["target"]
    settings = SkipSearchSettings(prompts=["hello", "abc"], max_tokens=12, temperature=0.7)
    reference = build_reference(target, settings.prompts, settings)
    params = SamplingParams(temperature=0.7)
    with torch.inference_mode():
        same = acceptance(target.model, reference, 0, params)
        assert same.shape == (12,) and torch.allclose(same, torch.ones(12))
        with layers_skipped(target.model, [1]) as cut:
            lower = acceptance(cut, reference, 1, params)
    assert bool((lower < 1).all()) and bool((lower > 0).all())


def test_short_search_respects_max_skip_and_writes_json(tiny, tmp_path):
    settings = SkipSearchSettings(prompts=["hello", "abc", "xyz"], trials=8, max_skip=1, max_tokens=8,
                                  timing_steps=4, progress=False)
    result, study = search_skip(tiny["target"], settings)
    assert result.trials == 8 and result.completed_trials + result.pruned_trials == 8
    assert result.best.skip_layers in ([0], [1])
    completed = [h for h in result.history if h["state"] == "complete"]
    assert completed and all(len(h["skip_layers"]) == 1 for h in completed)
    assert result.best.expected_speedup == max(h["expected_speedup"] for h in completed)
    write_result(result, tmp_path / "best.json")
    data = json.loads((tmp_path / "best.json").read_text())
    assert data["skip_layers"] == result.best.skip_layers and 0 <= data["acceptance"] <= 1
    assert data["num_layers"] == 2 and data["cost_ratio"] > 0 and 1 <= data["k"] <= 8


@pytest.mark.real_models
def test_cli_search_on_the_real_target_writes_json_and_plot(tmp_path):
    """The CI-sized search the README shows: its JSON feeds `splitspec draft --skip-layers-file`."""
    from splitspec.layerskip import read_skip_file

    root = real_model_dir()
    prompts = root.parent / "prompts" / "tinystories.jsonl"
    if not prompts.is_file():
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "Once upon a time"}\n{"prompt": "Tom had a red ball"}\n')
    output = tmp_path / "best.json"
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "search-skip", "--model", str(root / "tinystories-260k"),
         "--prompts", str(prompts), "--trials", "6", "--num-prompts", "2", "--max-tokens", "24",
         "--output", str(output), "--plot", "--no-progress"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best skip set" in done.stdout
    data = json.loads(output.read_text())
    assert set(data["skip_layers"]) <= set(range(5)) and 1 <= len(data["skip_layers"]) <= 4
    assert read_skip_file(str(output)) == sorted(data["skip_layers"])
    assert data["trials"] == 6 and len(data["history"]) == 6 and data["prompts"] == 2
    assert output.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_bad_max_skip_in_one_line(tiny_dirs, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "search-skip", "--model", str(tiny_dirs["target"]), "--prompts",
         str(prompts), "--max-skip", "2", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "splitspec search-skip: --max-skip must be in [1, 1] for a 2-layer model, got 2"]
