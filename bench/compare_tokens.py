"""Compare the greedy tokens of two `pipeline bench` results (e.g. tp=1 and tp=2 of one model), batch 1.

    python bench/compare_tokens.py tp1.json tp2.json      # exit 1 when they differ
"""

import json
import sys


def batch1_tokens(path: str) -> list[int]:
    result = json.load(open(path))
    batch = next(b for b in result["batches"] if b["batch"] == 1)
    return batch["tokens"][0]


def main() -> int:
    a, b = (batch1_tokens(p) for p in sys.argv[1:3])
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"greedy tokens, batch 1: {same} of {min(len(a), len(b))} identical "
          f"({'same' if a == b else f'DIFFERENT from position {same}'})")
    return 0 if a == b else 1


if __name__ == "__main__":
    sys.exit(main())
