"""Long-context evaluation sets the project ships: retrieval, QA over a passage, summarization.

Every example is generated from a seed, so the sets are fixed without shipping them: the
text comes from ``data/haystack.txt`` (prose paragraphs of the Python Language Reference,
see ``tools/make_haystack.py``), the facts from small word lists below.

- **retrieval** (RULER-style multi-key needle): four "special magic number" sentences for
  four different cities are inserted at random sentence boundaries of a ~``tokens``-token
  haystack; the question asks for one. Scored by exact match of the 7-digit number.
- **qa**: facts of five kinds (a day, a place, a weight, a time, a colour) about people; one
  is asked, two facts of other kinds about other people distract, inside a ~``tokens/2``-token
  passage. (Same-kind distractors were tried first: the dense 135M model binds the wrong
  name to the value in most of them, so the set measured the model, not the compression.)
- **summarize**: a passage of three to five paragraphs and a request for a two-sentence
  summary. No reference: scored as agreement (ROUGE-L F1) with the dense model's summary.

``split="calib"`` and ``split="eval"`` draw from disjoint seeds: calibration (the scorer's head
choice) never sees an evaluation example.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

FAMILIES = ("retrieval", "qa", "summarize")
_SPLIT_SEED = {"eval": 0, "calib": 100_000}
_CHARS_PER_TOKEN = 4.4  # SmolLM2's tokenizer on this prose (measured: 4.3–4.5)

CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dublin", "Accra", "Riga", "Perth",
    "Tunis", "Bern", "Cairo", "Seoul", "Porto", "Turin", "Zagreb", "Dakar", "Kyoto", "Malmo",
)  # fmt: skip
NAMES = (
    "Maria", "Tomas", "Aisha", "Kenji", "Priya", "Lars", "Fatima", "Diego", "Ingrid", "Omar",
    "Chloe", "Mateo", "Sofia", "Ivan", "Leila", "Pedro", "Hana", "Felix", "Nadia", "Victor",
)  # fmt: skip
_FACTS = {
    "day": (
        "The meeting with {name} is scheduled for {value}.",
        "On which day is the meeting with {name}?",
        ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    ),
    "place": (
        "{name} keeps the spare key in the {value}.",
        "Where does {name} keep the spare key?",
        ("garage", "kitchen drawer", "mailbox", "garden shed", "blue vase", "attic", "toolbox"),
    ),
    "weight": (
        "The parcel addressed to {name} weighs {value} kilograms.",
        "How many kilograms does the parcel addressed to {name} weigh?",
        tuple(str(n) for n in range(3, 60)),
    ),
    "time": (
        "The train {name} takes leaves at {value}.",
        "At what time does the train {name} takes leave?",
        ("06:15", "07:40", "08:05", "09:30", "11:20", "13:45", "15:10", "17:55", "19:25", "21:50"),
    ),
    "colour": (
        "The bicycle that belongs to {name} is painted {value}.",
        "What colour is the bicycle that belongs to {name}?",
        ("red", "green", "yellow", "orange", "purple", "silver", "white", "black", "turquoise"),
    ),
}


@dataclass(frozen=True)
class LongExample:
    id: str
    family: str
    instruction: str
    context: str
    question: str
    answer: str | None  # None: scored against the dense model's output
    evidence: tuple[str, ...]  # the context sentences that hold the answer
    kind: str = ""  # qa: which fact kind is asked

    def correct(self, output: str) -> bool | None:
        """The output's *first* candidate answer is the right one (None: no reference answer).

        First, not any: "Thursday, not Wednesday" answers Thursday. Candidates are 7-digit
        numbers (retrieval) or the asked kind's values (QA).
        """
        if self.answer is None:
            return None
        if self.family == "retrieval":
            m = re.search(r"(?<![0-9])[0-9]{7}(?![0-9])", output)
            return m is not None and m.group(0) == self.answer
        values = _FACTS[self.kind][2] if self.kind else (self.answer,)
        pattern = (
            r"(?<![\w:])("
            + "|".join(re.escape(v.lower()) for v in sorted(values, key=len, reverse=True))
            + r")(?![\w:])"
        )
        m = re.search(pattern, output.lower())
        return m is not None and m.group(1) == self.answer.lower()

    def prompt(self) -> str:
        return "\n\n".join(p for p in (self.instruction, self.context, self.question) if p)


@lru_cache(maxsize=1)
def haystack() -> tuple[str, ...]:
    text = resources.files("cscompile.data").joinpath("haystack.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]


def _passage(rng: random.Random, tokens: int, facts: list[str]) -> str:
    """Paragraphs up to ~``tokens``, with each fact inserted at a random sentence boundary."""
    paras = list(haystack())
    rng.shuffle(paras)
    chosen, size = [], 0
    for p in paras:
        if size >= tokens * _CHARS_PER_TOKEN:
            break
        chosen.append(_sentences(p))
        size += len(p)
    limit = 2 * tokens * _CHARS_PER_TOKEN  # short contexts (small test models): cut the last paragraph
    while size > limit and len(chosen[-1]) > 1:
        size -= len(chosen[-1].pop()) + 1
    for fact in facts:
        para = chosen[rng.randrange(len(chosen))]
        para.insert(rng.randint(0, len(para)), fact)
    return "\n\n".join(" ".join(p) for p in chosen)


def make_example(family: str, index: int, tokens: int = 1000, split: str = "eval") -> LongExample:
    """Example ``index`` of ``family`` (deterministic)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    rng = random.Random(f"{family}:{tokens}:{_SPLIT_SEED[split] + index}")
    eid = f"{family}-{tokens}-{split}-{index:03d}"
    if family == "retrieval":
        cities = rng.sample(CITIES, 4)
        needles = [
            f"The special magic number for {c} is {rng.randint(1_000_000, 9_999_999)}." for c in cities
        ]
        context = _passage(rng, tokens, needles)
        answer = needles[0].rsplit(" ", 1)[1].rstrip(".")
        question = f"What is the special magic number for {cities[0]}? Answer with the number only."
        return LongExample(eid, family, "", context, question, answer, (needles[0],))
    if family == "qa":
        kinds = rng.sample(sorted(_FACTS), 3)
        names = rng.sample(NAMES, 3)
        facts, vals = [], []
        for kind, name in zip(kinds, names):
            vals.append(rng.choice(_FACTS[kind][2]))
            facts.append(_FACTS[kind][0].format(name=name, value=vals[-1]))
        context = _passage(rng, tokens // 2, facts)
        instruction = "Read the text and answer the question at the end with a short answer."
        question = _FACTS[kinds[0]][1].format(name=names[0])
        return LongExample(eid, family, instruction, context, question, vals[0], (facts[0],), kinds[0])
    n_paras = rng.randint(3, 5)
    paras = rng.sample(haystack(), n_paras)
    question = "Summarize the text above in two sentences."
    return LongExample(eid, family, "", "\n\n".join(paras), question, None, ())


def long_context_set(family: str, n: int, tokens: int = 1000, split: str = "eval") -> list[LongExample]:
    return [make_example(family, i, tokens, split) for i in range(n)]


def rouge_l(reference: str, candidate: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (LCS by dynamic programming)."""
    a = re.findall(r"\w+", reference.lower())
    b = re.findall(r"\w+", candidate.lower())
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)
