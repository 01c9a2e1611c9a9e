"""Write ``cscompile/data/haystack.txt``: prose paragraphs for the long-context sets.

Source: the Python Language Reference as shipped inside CPython (``pydoc_data.topics``,
PSF documentation licence) — natural English on every machine, no download. Kept are
paragraphs of 200–900 characters that are prose (no code, tables or markup). The file is
committed, so the evaluation sets do not change with the interpreter's version.

    python tools/make_haystack.py
"""

from __future__ import annotations

import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cscompile" / "data" / "haystack.txt"


def prose_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(line.strip() for line in para.splitlines()).strip()
            if not 200 <= len(text) <= 900 or any(c in text for c in "*>|{}[]="):
                continue
            if sum(ch.isalpha() or ch == " " for ch in text) / len(text) < 0.93:
                continue
            if text.endswith(":"):  # introduces an example that was cut away
                continue
            out.append(re.sub(r"\s+", " ", text))
    return out


def main() -> None:
    paras = prose_paragraphs()
    OUT.write_text("\n".join(paras) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(paras)} paragraphs, {sum(map(len, paras))} characters")


if __name__ == "__main__":
    main()
