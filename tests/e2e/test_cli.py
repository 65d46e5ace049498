"""The `splitspec` command as a user runs it: `up`, `generate` (text, --json, --prompts-file),
one-line errors, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.support import free_port, launch_up

SPLITSPEC = [sys.executable, "-m", "entrypoints.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SPLITSPEC, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def up(tiny_dirs):
    process, address = launch_up("--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft_noisy"]),
                                 "--k", "3", "--threads", "1")
    yield process, address
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)


def test_generate_json_is_greedy_target_output(up, tiny):
    _, address = up
    result = run("generate", "--coordinator", address, "hello there", "--max-tokens", "24", "--temperature", "0",
                 "--k", "2", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"text", "token_ids", "finish_reason", "usage", "spec"}
    target = tiny["target"]
    prompt_ids = target.tokenizer("hello there").input_ids
    with torch.inference_mode():
        expected = target.model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    assert payload["token_ids"] == expected
    assert payload["text"] == target.tokenizer.decode(expected, skip_special_tokens=True)
    assert payload["finish_reason"] == "length"
    assert payload["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 24}
    assert payload["spec"]["rounds"] > 0 and 0 <= payload["spec"]["accepted_tokens"] <= payload["spec"]["draft_tokens"]


def test_prompts_file_answers_in_input_order(up, tmp_path):
    _, address = up
    lengths = [9, 3, 14, 1, 6]
    lines = [json.dumps({"prompt": f"story {i}", "max_tokens": n, "ignore_eos": True}) for i, n in enumerate(lengths)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    result = run("generate", "--coordinator", address, "--prompts-file", str(prompts), "--concurrency", "3",
                 "--temperature", "0.7", "--seed", "5")
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["usage"]["completion_tokens"] for o in outputs] == lengths


def test_streaming_prints_text(up):
    _, address = up
    result = run("generate", "--coordinator", address, "hi", "--max-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "8 tokens" in result.stderr


@pytest.mark.parametrize(
    "args,field",
    [(["--top-p", "2"], "top_p"), (["--max-tokens", "-1"], "max_tokens"), (["--k", "99"], "k"),
     (["--stop", ""], "stop"), (["--temperature", "nan"], "temperature")],
)
def test_bad_input_is_one_line_and_non_zero(up, args, field):
    _, address = up
    result = run("generate", "--coordinator", address, "hi", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "INVALID_ARGUMENT" in lines[0] and f"{field}:" in lines[0]


def test_malformed_model_directory_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = run("target", "--model", str(tmp_path), "--port", str(free_port()))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert str(tmp_path) in last and "weights" in last and "tokenizer" in last


def test_unreachable_worker_is_one_line():
    result = run("coordinator", "--target", f"127.0.0.1:{free_port()}", "--port", str(free_port()),
                 "--connect-timeout", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "no target worker is serving" in result.stderr.strip().splitlines()[-1]


def test_sigterm_stops_all_services(up):
    process, address = up
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 3  # target, draft, coordinator (no gateway: --http-port 0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_up_starts_a_local_pool(tiny_dirs):
    from tests.support import alive, process_tree

    process, address = launch_up("--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft_noisy"]),
                                 "--targets", "2", "--drafts", "2", "--threads", "1")
    try:
        commands = [open(f"/proc/{pid}/cmdline").read().split("\0") for pid in process_tree(process.pid) if alive(pid)]
        roles = [c[3] for c in commands if len(c) > 3 and c[1:3] == ["-m", "entrypoints.cli"]]
        assert sorted(roles) == ["coordinator", "draft", "draft", "target", "target"]
        coordinator = next(c for c in commands if "coordinator" in c)
        assert coordinator.count("--target") == 2 and coordinator.count("--draft") == 2
        result = run("generate", "--coordinator", address, "pool", "--max-tokens", "10", "--temperature", "0",
                     "--ignore-eos", "--json")
        assert result.returncode == 0 and json.loads(result.stdout)["usage"]["completion_tokens"] == 10
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the core plan needs 2 or more cores")
def test_up_verifies_proposals_on_the_targets_own_cores_and_stays_greedy(tiny_dirs, tiny):
    """On 2+ cores `up` gives the target every core and --verify-cores the non-draft ones; rounds
    with proposals (k = 2) and target-only rounds (k = 0) switch its cores step by step, and the
    greedy output stays the target's."""
    from tests.support import alive, process_tree

    cores = sorted(os.sched_getaffinity(0))
    process, address = launch_up("--target", str(tiny_dirs["target"]), "--draft", str(tiny_dirs["draft_noisy"]))
    try:
        commands = [open(f"/proc/{pid}/cmdline").read().split("\0") for pid in process_tree(process.pid) if alive(pid)]
        target = next(c for c in commands if len(c) > 3 and c[3] == "target")
        split = max(1, len(cores) // 4)
        assert target[target.index("--cpu-cores") + 1] == ",".join(map(str, cores))
        assert target[target.index("--verify-cores") + 1] == ",".join(map(str, cores[split:]))
        model = tiny["target"]
        prompt_ids = model.tokenizer("once upon").input_ids
        with torch.inference_mode():
            expected = model.model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        for k in ("2", "0", "2"):
            result = run("generate", "--coordinator", address, "once upon", "--max-tokens", "16", "--temperature",
                         "0", "--k", k, "--ignore-eos", "--json")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["token_ids"] == expected, k
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("drafter", [["--draft-method", "ngram", "--ngram-min", "1"],
                                     ["--draft-method", "layerskip", "--skip-layers", "1"]], ids=["ngram", "layerskip"])
def test_up_with_a_model_free_or_self_speculative_draft(tiny_dirs, tiny, drafter):
    """No --draft model: the draft worker serves the target's layers minus --skip-layers, or n-gram
    lookup over the target's vocabulary; greedy output stays the target's."""
    from tests.support import alive, process_tree

    process, address = launch_up("--target", str(tiny_dirs["target"]), *drafter, "--threads", "1")
    try:
        commands = [open(f"/proc/{pid}/cmdline").read().split("\0") for pid in process_tree(process.pid) if alive(pid)]
        draft = next(c for c in commands if len(c) > 3 and c[3] == "draft")
        assert draft[draft.index("--model") + 1] == str(tiny_dirs["target"])
        assert draft[draft.index("--method") + 1] == drafter[1]
        prompt = "abcabcabc"
        result = run("generate", "--coordinator", address, prompt, "--max-tokens", "30", "--temperature", "0",
                     "--ignore-eos", "--json")
        assert result.returncode == 0, result.stderr
        target = tiny["target"]
        ids = target.tokenizer(prompt).input_ids
        with torch.inference_mode():
            expected = target.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        payload = json.loads(result.stdout)
        assert payload["token_ids"] == expected
        if drafter[1] == "layerskip":
            assert payload["spec"]["rounds"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_layerskip_without_a_skip_set_is_one_line(tiny_dirs):
    result = run("draft", "--model", str(tiny_dirs["target"]), "--method", "layerskip", "--port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("splitspec draft: --skip-layers: layerskip needs")


def test_model_nice_out_of_range_is_one_line(tiny_dirs):
    result = run("target", "--model", str(tiny_dirs["target"]), "--model-nice", "-5", "--port", str(free_port()))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--model-nice must be between 0 and 19, got -5" in result.stderr.strip().splitlines()[-1]


def test_up_on_a_port_in_use_is_one_line(tiny_dirs):
    """`up` checks health by port: a port another server holds would answer for it."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run("up", "--target", str(tiny_dirs["target"]), "--port", str(port), "--http-port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"splitspec up: --port {port}: the port is in use")
