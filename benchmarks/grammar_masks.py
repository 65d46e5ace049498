"""Grammar-mask speed of xgrammar and llguidance: the time to compute one next-token bitmask, and
to advance the matcher by one token, walking a JSON document token by token under a JSON schema,
on a given Hugging Face tokenizer and on a synthetic 128k-token vocabulary (a Llama-3-sized one:
the byte tokens, then pseudo-words with and without a leading space, numbers and punctuation).

  pip install llguidance   # xgrammar is splitspec's own dependency
  python benchmarks/grammar_masks.py --tokenizer $SPLITSPEC_MODEL_DIR/tinystories-260k
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import time
from typing import Any, Callable

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad"]},
        "pet": {"type": "object", "properties": {"kind": {"type": "string"}, "legs": {"type": "integer"}},
                "required": ["kind", "legs"], "additionalProperties": False},
    },
    "required": ["name", "age", "mood", "pet"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({"name": "Lily Rose", "age": 3, "mood": "happy", "pet": {"kind": "dog", "legs": 4}})


class SyntheticVocabulary:
    """`size` tokens: 256 bytes, then pseudo-words; encodes by greedy longest match."""

    def __init__(self, size: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        pieces = [bytes([b]) for b in range(256)]
        seen = set(pieces)
        fixed = [f'"{w}"'.encode() for w in ("name", "age", "mood", "pet", "kind", "legs")] + \
                [p.encode() for p in ('{"', '":', '", "', '}', ', "', ': ', '": "')] + \
                [str(n).encode() for n in range(10000)]
        for piece in fixed:
            if piece not in seen:
                seen.add(piece)
                pieces.append(piece)
        while len(pieces) < size - 2:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10)))
            for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
                piece = variant.encode()
                if piece not in seen and len(pieces) < size - 2:
                    seen.add(piece)
                    pieces.append(piece)
        self.tokens = pieces + [b"<s>", b"</s>"]
        self.bos_token_id, self.eos_token_id = size - 2, size - 1
        self.special_token_ids = [size - 2, size - 1]
        self._ids = {piece: i for i, piece in enumerate(self.tokens[:-2])}

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids, at = [], 0
        while at < len(data):
            for length in range(min(12, len(data) - at), 0, -1):
                token = self._ids.get(data[at: at + length])
                if token is not None:
                    ids.append(token)
                    at += length
                    break
        return ids


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def walk_llguidance(tokenizer: Any, tokens: list[int], compiles: list[float]) -> tuple[list[float], list[float]]:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compiles.append(time.perf_counter() - start)
    bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
    masks, advances = [], []
    for token in tokens:
        masks.append(timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)))
        advances.append(timed(lambda: matcher.consume_token(token)))
        assert not matcher.is_error(), matcher.get_error()
    return masks, advances


def walk_xgrammar(info: Any, tokens: list[int], compiles: list[float]) -> tuple[list[float], list[float]]:
    import xgrammar as xgr

    start = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compiles.append(time.perf_counter() - start)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    masks, advances = [], []
    for token in tokens:
        masks.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask)))
        accepted: list[bool] = []
        advances.append(timed(lambda: accepted.append(matcher.accept_token(token))))
        assert accepted[0], f"xgrammar refused token {token}"
    return masks, advances


def summary(name: str, vocab: str, size: int, masks: list[float], advances: list[float],
            compiles: list[float]) -> dict[str, Any]:
    us = [m * 1e6 for m in masks]
    return {"library": name, "compile_ms_median": round(statistics.median(compiles) * 1e3, 2), "vocabulary": vocab, "vocab_size": size, "tokens": len(masks),
            "mask_us_median": round(statistics.median(us), 1), "mask_us_p99": round(sorted(us)[int(0.99 * (len(us) - 1))], 1),
            "mask_us_max": round(max(us), 1), "advance_us_median": round(statistics.median(a * 1e6 for a in advances), 1)}


def run(hf_path: str | None, synthetic_size: int, repeats: int) -> list[dict[str, Any]]:
    import llguidance
    import llguidance.hf
    import xgrammar as xgr

    rows = []
    vocabularies = []
    if hf_path:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(hf_path)
        tokens = hf(DOCUMENT, add_special_tokens=False).input_ids
        while tokens and not hf.convert_tokens_to_string(hf.convert_ids_to_tokens(tokens[:1])).strip():
            tokens = tokens[1:]  # SentencePiece's dummy-prefix space: not part of the document
        while tokens and hf.convert_ids_to_tokens(tokens[0]) == "▁":
            tokens = tokens[1:]
        vocabularies.append((hf_path.rstrip("/").split("/")[-1], len(hf), tokens, llguidance.hf.from_tokenizer(hf),
                             xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))))
    synthetic = SyntheticVocabulary(synthetic_size)
    tokens = synthetic(DOCUMENT)
    vocabularies.append((f"synthetic-{synthetic_size // 1000}k", synthetic_size, tokens,
                         llguidance.LLTokenizer(llguidance.TokenizerWrapper(synthetic)),
                         xgr.TokenizerInfo(synthetic.tokens, vocab_type=xgr.VocabType.RAW,
                                           stop_token_ids=[synthetic.eos_token_id])))
    for vocab, size, tokens, ll_tokenizer, xg_info in vocabularies:
        for name, walk in (("llguidance", walk_llguidance), ("xgrammar", walk_xgrammar)):
            masks, advances, compiles = [], [], []
            for _ in range(repeats):
                m, a = walk(ll_tokenizer if name == "llguidance" else xg_info, tokens, compiles)
                masks += m
                advances += a
            rows.append(summary(name, vocab, size, masks, advances, compiles))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory")
    parser.add_argument("--synthetic-size", type=int, default=128_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = run(args.tokenizer, args.synthetic_size, args.repeats)
    print("| library | vocabulary | tokens walked | schema compile ms | mask µs median | p99 | max | advance µs median |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['library']} | {r['vocabulary']} ({r['vocab_size']}) | {r['tokens']} | {r['compile_ms_median']} | {r['mask_us_median']} | "
              f"{r['mask_us_p99']} | {r['mask_us_max']} | {r['advance_us_median']} |")


if __name__ == "__main__":
    main()
