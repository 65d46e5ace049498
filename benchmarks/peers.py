"""Side by side: splitspec and the engines a user would pick instead, on the same prompts and settings.

Each system is an OpenAI-compatible completions server, given as NAME=URL (already running) or
NAME=COMMAND (started here; `{port}` in it is replaced by a free port, and the server is ready
when GET /health answers 200). Every system gets the same greedy requests (`--requests` prompts
of the prompt set, `--max-tokens` tokens each, `ignore_eos`), first one at a time and then at each
`--concurrency`; the figure is the sum of output tokens over wall time. Systems run one after
another, each stopped (SIGTERM) before the next starts. With `--rounds N` (N >= 2) every system
is started first (one after another, each idle once healthy) and the measurements interleave: in
each round, each concurrency on each system, the systems' order rotating from round to round; a
cell is the median over the rounds, with the least and greatest. This VM's speed drifts by 15-30%
within minutes (the same target-only stack, c = 1: 77.6 and 101.9 tok/s half an hour apart), so
systems measured one after another compare the machine's moments as much as the systems.
Greedy texts are compared with the first system's: where they differ, the report names the
prompt and the first differing character.
`--assisted TARGET,DRAFT` also measures `transformers` assisted generation in this process
(concurrency 1 only: `generate` serves one request at a time).

  python benchmarks/peers.py --prompts ../shared/prompts/tinystories.jsonl --concurrency 1,4 \
      --system 'splitspec=splitspec up --target T --draft D --port 0 --http-port {port}' \
      --system 'vllm=bash ../shared/peers/serve-vllm.sh T {port} D 3' \
      --system 'llama.cpp=bash ../shared/peers/serve-llama.sh T.gguf {port} D.gguf 3' \
      --body 'llama.cpp={"cache_prompt": false}' --out bench-results/peers

Writes OUT.json (every row), OUT.md (the table) and OUT.png (tokens/s against concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass(slots=True)
class System:
    name: str
    target: str                    # a URL, or a command with {port}
    body: dict = field(default_factory=dict)

    @property
    def is_url(self) -> bool:
        return self.target.startswith(("http://", "https://"))


@dataclass(slots=True)
class Row:
    system: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    texts: list[str]
    runs: list[float] = field(default_factory=list)  # tok/s of each round (--rounds), in round order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")  # a name holds no "="
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


async def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was healthy (see its log)")
            try:
                if (await client.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} was not healthy after {timeout:.0f} s")


async def model_name(client: httpx.AsyncClient, url: str) -> str:
    reply = await client.get(f"{url}/v1/models")
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


async def complete(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, str]:
    reply = await client.post(f"{url}/v1/completions", json=body)
    if reply.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:500]}")
    data = reply.json()
    return data["usage"]["completion_tokens"], data["choices"][0]["text"]


async def measure(url: str, system: System, prompts: list[str], concurrency: int, max_tokens: int) -> Row:
    async with httpx.AsyncClient(timeout=600) as client:
        model = await model_name(client, url)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> tuple[int, str]:
            async with semaphore:
                return await complete(client, url, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, "ignore_eos": True, **system.body})

        await one(prompts[0])  # warm-up: first-request costs are not what is measured
        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - start
    tokens = sum(n for n, _ in results)
    return Row(system.name, concurrency, len(prompts), tokens, round(seconds, 2), round(tokens / seconds, 1),
               [text for _, text in results])


async def start_system(system: System, args: argparse.Namespace) -> tuple[subprocess.Popen | None, str]:
    """Start `system` (unless it is a URL) and wait until it is healthy: (its process, its URL)."""
    process, url = None, system.target.rstrip("/")
    if not system.is_url:
        port = free_port()
        command = system.target.replace("{port}", str(port))
        print(f"[{system.name}] starting: {command}", file=sys.stderr, flush=True)
        log_path = Path(args.out).with_name(Path(args.out).name + f"-{system.name.replace(' ', '_')}.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as server_log:
            process = subprocess.Popen(shlex.split(command), stdout=server_log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        await wait_healthy(url, process, args.startup_timeout)
    except BaseException:
        stop_system(process)
        raise
    print(f"[{system.name}] healthy after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return process, url


def stop_system(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def run_system(system: System, prompts: list[str], args: argparse.Namespace) -> list[Row]:
    process, url = await start_system(system, args)
    try:
        rows = []
        for concurrency in args.concurrency:
            row = await measure(url, system, prompts, concurrency, args.max_tokens)
            print(f"[{system.name}] concurrency {concurrency}: {row.tokens_per_s} tok/s", file=sys.stderr, flush=True)
            rows.append(row)
        return rows
    finally:
        stop_system(process)


def interleaved_order(systems: int, concurrencies: list[int], rounds: int) -> list[tuple[int, int, int]]:
    """(round, concurrency, system index) in the order `--rounds` measures them: each round takes
    every concurrency in turn, each on every system, the systems' order rotated by one and reversed
    from one to the next, so that no system always runs first or right after the same one."""
    order = []
    for turn, (round_index, concurrency) in enumerate((r, c) for r in range(rounds) for c in concurrencies):
        rotated = [(turn // 2 + i) % systems for i in range(systems)]
        order += [(round_index, concurrency, index) for index in (rotated[::-1] if turn % 2 else rotated)]
    return order


def median_row(rows: list[Row]) -> Row:
    """One system's rows at one concurrency, a row per round, as one: the median tok/s (the middle
    round's seconds and tokens), with every round's tok/s in `runs`; texts from the first round."""
    middle = sorted(rows, key=lambda r: r.tokens_per_s)[(len(rows) - 1) // 2]
    return Row(middle.system, middle.concurrency, middle.requests, middle.tokens, middle.seconds,
               middle.tokens_per_s, rows[0].texts, [r.tokens_per_s for r in rows])


async def run_interleaved(systems: list[System], prompts: list[str], args: argparse.Namespace) -> list[Row]:
    """Every system up at once, measured in `interleaved_order`; a row per system and concurrency."""
    running: list[tuple[System, subprocess.Popen | None, str]] = []
    try:
        for system in systems:
            try:
                running.append((system, *await start_system(system, args)))
            except RuntimeError as exc:
                print(f"[{system.name}] failed: {exc}", file=sys.stderr, flush=True)
        measured: dict[tuple[str, int], list[Row]] = {}
        for round_index, concurrency, index in interleaved_order(len(running), args.concurrency, args.rounds):
            system, _, url = running[index]
            row = await measure(url, system, prompts, concurrency, args.max_tokens)
            print(f"[{system.name}] round {round_index + 1}, concurrency {concurrency}: {row.tokens_per_s} tok/s",
                  file=sys.stderr, flush=True)
            measured.setdefault((system.name, concurrency), []).append(row)
        return [median_row(measured[(system.name, c)]) for system, _, _ in running for c in args.concurrency]
    finally:
        for _, process, _ in running:
            stop_system(process)


def run_assisted(spec: str, prompts: list[str], max_tokens: int, threads: int) -> list[Row]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from assisted_generation import run

    target_dir, draft_dir = spec.split(",")
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    run(target, tokenizer, prompts[:1], 8)
    rows = []
    for name, assistant in (("transformers generate", None), ("transformers assisted", draft)):
        texts: list[str] = []
        start = time.perf_counter()
        rate = run(target, tokenizer, prompts, max_tokens, assistant=assistant, texts=texts)
        seconds = time.perf_counter() - start
        rows.append(Row(name, 1, len(prompts), round(rate * seconds), round(seconds, 2), round(rate, 1), texts))
        print(f"[{name}] concurrency 1: {rate:.1f} tok/s", file=sys.stderr, flush=True)
    return rows


def agreement(rows: list[Row], reference: str) -> dict[str, str]:
    """Per system, 'n/m' greedy texts equal to the reference system's, with the first difference."""
    base = next(r for r in rows if r.system == reference and r.concurrency == min(x.concurrency for x in rows))
    report = {}
    for system in dict.fromkeys(r.system for r in rows):
        row = next(r for r in rows if r.system == system)
        same = sum(a == b for a, b in zip(row.texts, base.texts))
        note = f"{same}/{len(base.texts)}"
        for index, (a, b) in enumerate(zip(row.texts, base.texts)):
            if a != b:
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                note += f" (first: prompt {index}, character {at})"
                break
        report[system] = note
    return report


def table(rows: list[Row], concurrencies: list[int], agree: dict[str, str], reference: str) -> str:
    """Markdown: tok/s per system and concurrency (over rounds: median (least-greatest))."""
    lines = ["| system | " + " | ".join(f"concurrency {c} tok/s" for c in concurrencies)
             + f" | greedy texts equal to {reference} |", "|---|" + "---|" * (len(concurrencies) + 1)]
    for system in dict.fromkeys(r.system for r in rows):
        cells = []
        for c in concurrencies:
            row = next((r for r in rows if r.system == system and r.concurrency == c), None)
            cells.append("-" if row is None else f"{row.tokens_per_s:.1f}" if len(row.runs) < 2 else
                         f"{row.tokens_per_s:.1f} ({min(row.runs):.1f}-{max(row.runs):.1f})")
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {agree[system]} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r.system for r in rows):
        points = sorted((r.concurrency, r.tokens_per_s) for r in rows if r.system == system)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
    axes.set_xlabel("concurrent requests")
    axes.set_ylabel("output tokens/s")
    axes.set_xscale("log", base=2)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", action="append", type=parse_named, required=True, metavar="NAME=URL|COMMAND")
    parser.add_argument("--body", action="append", type=parse_named, default=[], metavar="NAME=JSON",
                        help="extra request fields for one system, e.g. llama.cpp's cache_prompt")
    parser.add_argument("--assisted", default=None, metavar="TARGET_DIR,DRAFT_DIR")
    parser.add_argument("--assisted-threads", type=int, default=2)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    parser.add_argument("--rounds", type=int, default=1,
                        help="N >= 2: every system up at once, measured N times in interleaved rounds (median)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--out", default="bench-results/peers")
    args = parser.parse_args()
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.requests]
    bodies = {name: json.loads(value) for name, value in args.body}
    systems = [System(name, target, bodies.get(name, {})) for name, target in args.system]
    rows: list[Row] = []
    if args.rounds >= 2:
        rows += await run_interleaved(systems, prompts, args)
    else:
        for system in systems:
            try:
                rows += await run_system(system, prompts, args)
            except RuntimeError as exc:
                print(f"[{system.name}] failed: {exc}", file=sys.stderr, flush=True)
    if args.assisted:
        rows += run_assisted(args.assisted, prompts, args.max_tokens, args.assisted_threads)
    if not rows:
        raise SystemExit("no system produced a result")
    reference = rows[0].system
    agree = agreement(rows, reference)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = table(rows, args.concurrency, agree, reference)
    out.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({
        "settings": {"requests": args.requests, "max_tokens": args.max_tokens, "temperature": 0,
                     "concurrency": args.concurrency, "prompts": args.prompts, "rounds": args.rounds,
                     "systems": {s.name: s.target for s in systems}},
        "agreement": agree, "rows": [asdict(r) for r in rows]}, indent=1), encoding="utf-8")
    plot(rows, out.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    asyncio.run(main())
