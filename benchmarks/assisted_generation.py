"""Concurrency-1 baseline: Hugging Face `transformers` assisted generation in one process
(`generate(..., assistant_model=draft)`), greedy, against the same target alone.

  python benchmarks/assisted_generation.py --target bench-models/target-48m --draft bench-models/draft-xs-wide \
      --prompts ../shared/prompts/tinystories.jsonl --max-tokens 64 --requests 8 --threads 2

Prints output tokens/s for target-only `generate` and for assisted generation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def run(model, tokenizer, prompts: list[str], max_tokens: int, assistant=None, texts: list[str] | None = None) -> float:
    """Output tokens/s over `prompts`, one after another; each completion's text goes to `texts`."""
    tokens, start = 0, time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            out = model.generate(ids, generation_config=config, assistant_model=assistant)
        tokens += out.shape[1] - ids.shape[1]
        if texts is not None:
            prompt_text = tokenizer.decode(ids[0], skip_special_tokens=True)  # the completion as servers return it
            texts.append(tokenizer.decode(out[0], skip_special_tokens=True)[len(prompt_text):])
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.requests]
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    run(target, tokenizer, prompts[:1], 8)  # warm-up
    alone = run(target, tokenizer, prompts, args.max_tokens)
    assisted = run(target, tokenizer, prompts, args.max_tokens, assistant=draft)
    print(json.dumps({"threads": args.threads, "target_only_tokens_per_s": round(alone, 1),
                      "assisted_tokens_per_s": round(assisted, 1), "speedup": round(assisted / alone, 3)}))


if __name__ == "__main__":
    main()
