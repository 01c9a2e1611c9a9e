"""Write the project's sentiment sets as JSONL (``{"text", "label"}`` per line) for ``--train``.

    python tools/make_sentiment.py [--out cscompile/data]

Binary and 3-class, short (1–8 sentences) and long (10–20), 600 train / 300 test each, from
:mod:`cscompile.evaluation.sentiment`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cscompile.evaluation.sentiment import sentiment_set, shipped_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "cscompile/data")
    args = ap.parse_args()
    for length in ("short", "long"):
        for classes in (2, 3):
            for split, n in (("train", 600), ("test", 300)):
                name = shipped_file(split, classes, length).name
                write(args.out / name, sentiment_set(n, classes, split, length))


def write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))
    print(f"{path}: {len(rows)} reviews")


if __name__ == "__main__":
    main()
