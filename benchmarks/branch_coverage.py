"""How often overlap has a branch for the verdict that comes true, by `--overlap-width`.

Greedy speculation of the real pair in one process (no server): each round the draft proposes k
tokens, the target's verdict is (a tokens accepted, then token t), and the round counts as
covered for width N when t is among the draft's N most likely tokens at that position other than
d_(a+1) (for a = k: its N most likely tokens after d_k), the candidates overlap drafts for.

  python benchmarks/branch_coverage.py --model-dir $SPLITSPEC_MODEL_DIR \
      --prompts ../shared/prompts/tinystories.jsonl --k 3 --num-prompts 24 --max-tokens 64

Prints one JSON object: rounds, verdicts by accepted count, and the covered fraction per width.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def next_logits(model, token_ids: list[int]) -> torch.Tensor:
    """Logits after every position: [len(token_ids), vocab]."""
    return model(torch.tensor([token_ids])).logits[0]


def one_round(target, draft, history: list[int], k: int,
              widths: list[int]) -> tuple[list[int], int, int, list[list[int]]]:
    """Returns (proposal, accepted, following token, candidates at the verdict's position per width)."""
    proposal: list[int] = []
    rows = []
    for _ in range(k + 1):
        row = next_logits(draft, history + proposal)[-1]
        rows.append(row)
        if len(proposal) < k:
            proposal.append(int(row.argmax()))
    verdict = next_logits(target, history + proposal)[len(history) - 1 :].argmax(-1).tolist()
    accepted = next((i for i in range(k) if verdict[i] != proposal[i]), k)
    ranked = rows[accepted].topk(max(widths) + 1).indices.tolist()
    if accepted < k:
        ranked = [t for t in ranked if t != proposal[accepted]]
    return proposal, accepted, verdict[accepted], [ranked[:width] for width in widths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="holds tinystories-260k and tinystories-xs")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--widths", default="1,2,3,4", help="overlap widths to report, comma-separated")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    root = Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(root / "tinystories-260k")
    target = AutoModelForCausalLM.from_pretrained(root / "tinystories-260k").eval()
    draft = AutoModelForCausalLM.from_pretrained(root / "tinystories-xs").eval()
    with open(args.prompts, encoding="utf-8") as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][: args.num_prompts]
    accepted_counts: Counter[int] = Counter()
    covered: Counter[int] = Counter()
    with torch.inference_mode():
        for prompt in prompts:
            history = tokenizer(prompt).input_ids
            generated = 0
            while generated < args.max_tokens:
                proposal_len = min(args.k, draft.config.max_position_embeddings - len(history) - 1)
                if proposal_len < 1:
                    break
                proposal, accepted, token, candidates = one_round(target, draft, history, proposal_len, widths)
                accepted_counts[accepted] += 1
                for width, tokens in zip(widths, candidates):
                    covered[width] += token in tokens
                history = history + proposal[:accepted] + [token]
                generated += accepted + 1
    rounds = sum(accepted_counts.values())
    print(json.dumps({"k": args.k, "rounds": rounds, "accepted": dict(sorted(accepted_counts.items())),
                      "covered_by_width": {w: round(covered[w] / rounds, 3) for w in widths}}))


if __name__ == "__main__":
    main()
