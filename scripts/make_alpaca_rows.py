"""A deterministic generated alpaca set for the data benchmark: `rows` examples of general text, ~290 tokens each
with the tiny base's tokenizer (about 58M tokens for 200,000 rows).

    python scripts/make_alpaca_rows.py OUT.jsonl [--rows 200000] [--seed 0]

Same rows for the same arguments on any machine (Python's random with a string seed). A third of the examples have
an `input`; instructions, inputs and outputs are sentences from tunekit.tiny's generated English.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def rows(count: int, seed: int):
    from tunekit.tiny import _paragraph, _sentence

    rng = random.Random(f"bench-alpaca-{seed}")
    for _ in range(count):
        row = {"instruction": _sentence(rng), "input": _sentence(rng) if rng.random() < 1 / 3 else "",
               "output": " ".join(_paragraph(rng) for _ in range(rng.randint(3, 9)))}
        yield row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tmp = Path(args.out + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows(args.rows, args.seed):
            handle.write(json.dumps(row) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
