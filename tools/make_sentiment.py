"""Write the project's sentiment sets as JSONL (``{"text", "label"}`` per line) for ``--train``.

    python tools/make_sentiment.py [--out cscompile/evaluation/data]

Binary and 3-class, 600 train / 300 test each, from :mod:`cscompile.evaluation.sentiment`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cscompile.evaluation.sentiment import sentiment_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "cscompile/evaluation/data"
    )
    args = ap.parse_args()
    for classes, tag in ((2, "binary"), (3, "3class")):
        for split, n in (("train", 600), ("test", 300)):
            path = args.out / f"sentiment-{tag}-{split}.jsonl"
            rows = sentiment_set(n, classes, split)
            path.write_text("".join(json.dumps({"text": r.text, "label": r.label}) + "\n" for r in rows))
            print(f"{path}: {len(rows)} reviews")


if __name__ == "__main__":
    main()
