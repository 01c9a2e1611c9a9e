"""A labelled sentiment set written for the project (issue 10): reviews of varied length.

Reviews are composed from hand-written sentences about five domains (restaurants, films,
hotels, phones, books): opinion sentences with a polarity and a strength, factual sentences
with none, contrast sentences ("The room was clean, but the walls were thin.") and closing
verdicts. The label is the sign of the strength-weighted sum, a verdict counting double;
``classes=3`` adds *neutral* (|sum| small, mostly facts). Some reviews are decided by their
first sentence, some only by their last ("At first I was not sure. … In the end I loved it."),
which is what a sentence-wise exit has to tell apart.

Deterministic from the seed; ``split`` ``train`` / ``test`` never share an example.
``tools/make_sentiment.py`` writes the sets as JSONL (``{"text", "label"}``), the format
``cscompile build --task classify --train`` reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAINS: dict[str, dict[str, Any]] = {
    "restaurant": {
        "pos": [
            ("The food was delicious.", 2), ("The staff were friendly and quick.", 1),
            ("Every dish arrived hot and beautifully plated.", 2), ("The dessert alone is worth the trip.", 2),
            ("Prices were fair for the portions.", 1), ("The wine list was a pleasant surprise.", 1),
        ],
        "neg": [
            ("The food was bland and overcooked.", 2), ("We waited forty minutes for a cold soup.", 2),
            ("The waiter was rude to us.", 2), ("The tables were sticky.", 1),
            ("It was far too loud to talk.", 1), ("The bill had two dishes we never ordered.", 2),
        ],
        "fact": [
            "We went on a Tuesday evening.", "The restaurant is near the station.", "We ordered three courses.",
            "The menu changes every season.", "There were six of us.", "They take reservations by phone.",
        ],
        "contrast": [
            ("The starters were excellent, but the main course was a letdown.", -1),
            ("The service was slow, but the food made up for it.", 1),
        ],
    },
    "film": {
        "pos": [
            ("The acting was superb.", 2), ("The story kept me hooked until the end.", 2),
            ("The soundtrack is gorgeous.", 1), ("It is funny without being silly.", 1),
            ("The final scene moved me to tears.", 2), ("The camera work is inventive.", 1),
        ],
        "neg": [
            ("The plot made no sense.", 2), ("I was bored after twenty minutes.", 2),
            ("The dialogue is clumsy.", 1), ("The ending felt rushed and cheap.", 2),
            ("The jokes fall flat.", 1), ("The lead actor seems to be asleep.", 2),
        ],
        "fact": [
            "The film runs for about two hours.", "It is based on a novel.", "I saw it in a small cinema.",
            "The director also wrote the script.", "It was shot in three countries.", "It came out last spring.",
        ],
        "contrast": [
            ("The first half drags, but the second half is thrilling.", 1),
            ("It looks stunning, but there is nothing underneath.", -1),
        ],
    },
    "hotel": {
        "pos": [
            ("The room was spotless.", 2), ("The bed was very comfortable.", 1),
            ("The staff went out of their way to help.", 2), ("Breakfast was generous and fresh.", 1),
            ("The view from the balcony was wonderful.", 2), ("Check-in took two minutes.", 1),
        ],
        "neg": [
            ("The room smelled of smoke.", 2), ("The shower was broken for three days.", 2),
            ("Nobody at the desk could help us.", 2), ("The walls were paper thin.", 1),
            ("Breakfast was stale.", 1), ("They charged us for a minibar we never opened.", 2),
        ],
        "fact": [
            "We stayed for four nights.", "The hotel has eighty rooms.", "It is a short walk from the beach.",
            "We booked through the website.", "Parking costs extra.", "Our room was on the fifth floor.",
        ],
        "contrast": [
            ("The location is perfect, but the rooms are tired.", -1),
            ("The lobby is dated, but the rooms were lovely.", 1),
        ],
    },
    "phone": {
        "pos": [
            ("The battery easily lasts two days.", 2), ("The screen is bright and sharp.", 1),
            ("It feels fast in every app.", 1), ("The camera takes excellent photos at night.", 2),
            ("It is the best phone I have owned.", 2), ("Setting it up was painless.", 1),
        ],
        "neg": [
            ("The battery dies before lunch.", 2), ("It gets hot when charging.", 1),
            ("The camera photos look washed out.", 1), ("It froze twice on the first day.", 2),
            ("The speaker crackles at any volume.", 2), ("Support never answered my emails.", 2),
        ],
        "fact": [
            "I have used it for a month.", "It comes in three colours.", "I bought the larger model.",
            "It has two SIM slots.", "The box includes a cable but no charger.", "It replaced my old phone.",
        ],
        "contrast": [
            ("The hardware is great, but the software is full of bugs.", -1),
            ("It is a bit heavy, but everything else is excellent.", 1),
        ],
    },
    "book": {
        "pos": [
            ("The characters feel real.", 2), ("I could not put it down.", 2),
            ("The writing is elegant.", 1), ("It made me laugh out loud.", 1),
            ("The ending is perfect.", 2), ("I learned a lot from it.", 1),
        ],
        "neg": [
            ("The characters are flat.", 2), ("I had to force myself to finish it.", 2),
            ("The prose is clumsy and repetitive.", 1), ("The twist is obvious from page ten.", 1),
            ("The ending is a mess.", 2), ("It is full of errors.", 2),
        ],
        "fact": [
            "It is about four hundred pages long.", "It is the author's second novel.", "I read it on holiday.",
            "It is set in a coastal town.", "The chapters are short.", "It was translated from Italian.",
        ],
        "contrast": [
            ("The opening is slow, but it becomes gripping.", 1),
            ("The premise is clever, but the execution is poor.", -1),
        ],
    },
}  # fmt: skip
OPENERS_UNSURE = [
    "At first I was not sure what to think.",
    "I had mixed expectations.",
    "I went in with no opinion.",
]
VERDICT = {
    1: ["Overall, I loved it.", "In the end I would happily recommend it.", "Highly recommended."],
    -1: ["Overall, I would not recommend it.", "In the end it was a waste of money.", "I will not be back."],
}
LABELS = {2: ("negative", "positive"), 3: ("negative", "neutral", "positive")}
#: domain-free narrative for long reviews: who came, when, why (no polarity)
NARRATIVE = [
    "My sister came along with me.", "We had planned this for weeks.", "It was raining that day.",
    "I had read a few reviews beforehand.", "A friend had recommended it to me.", "We arrived a little early.",
    "It was my first time trying something like this.", "I paid for it myself.", "We went as a group of friends.",
    "It was a birthday treat.", "I am usually hard to impress.", "I wrote this review a week later.",
    "We did not have much time that day.", "I took a few notes along the way.", "It was a busy weekend.",
    "My partner had been there before.", "I compared it with a similar one last year.", "We talked about it for days.",
]  # fmt: skip
LENGTHS = ("short", "long")


@dataclass(frozen=True)
class Review:
    text: str
    label: str
    sentences: tuple[str, ...]
    domain: str


def make_review(index: int, classes: int = 2, length: str = "short") -> Review:
    """Candidate review ``index`` (deterministic) with a label in ``LABELS[classes]``.

    ``length="long"``: 10–20 sentences, like a real review site's (see :func:`_long_review`).
    """
    if classes not in LABELS:
        raise ValueError(f"classes must be 2 or 3, not {classes}")
    if length not in LENGTHS:
        raise ValueError(f"length must be short or long, not {length!r}")
    if length == "long":
        return _long_review(index, classes)
    rng = random.Random(f"sentiment:{classes}:{index}")
    domain = rng.choice(sorted(DOMAINS))
    d = DOMAINS[domain]
    target = rng.choice(LABELS[classes])
    sign = {"positive": 1, "negative": -1, "neutral": 0}[target]
    n = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8])
    shape = rng.random()
    out: list[tuple[str, int]] = []
    if sign == 0:  # facts, perhaps one mild opinion of each side
        out = [(s, 0) for s in rng.sample(d["fact"], min(n, len(d["fact"])))]
        if n >= 3 and rng.random() < 0.5:
            out.insert(rng.randrange(len(out) + 1), (rng.choice([s for s, w in d["pos"] if w == 1]), 1))
            out.insert(rng.randrange(len(out) + 1), (rng.choice([s for s, w in d["neg"] if w == 1]), -1))
    else:
        side, other = ("pos", "neg") if sign > 0 else ("neg", "pos")
        if n >= 3 and shape < 0.3:  # decided late: unsure or contrary opening, verdict at the end
            out.append((rng.choice(OPENERS_UNSURE), 0))
            if rng.random() < 0.5:
                s, w = rng.choice(d[other])
                out.append((s, -sign * min(w, 1)))
            out += [(s, 0) for s in rng.sample(d["fact"], min(n - len(out) - 1, 2))]
            out.append((rng.choice(VERDICT[sign]), 3 * sign))
        else:
            k = max(1, (n + 1) // 2)
            out += [(s, sign * w) for s, w in rng.sample(d[side], min(k, len(d[side])))]
            out += [(s, 0) for s in rng.sample(d["fact"], min(n - len(out), len(d["fact"])))]
            contrasts = [c for c in d["contrast"] if c[1] == sign]
            if n >= 4 and contrasts and rng.random() < 0.5:
                out.append((contrasts[0][0], sign))
            rng.shuffle(out)
            if n >= 5 and rng.random() < 0.5:
                out.append((rng.choice(VERDICT[sign]), 3 * sign))
    total = sum(w for _, w in out)
    assert (total > 0) - (total < 0) == sign, (out, target)  # the construction decides the label
    sentences = tuple(s for s, _ in out)
    return Review(" ".join(sentences), target, sentences, domain)


def _long_review(index: int, classes: int) -> Review:
    """10–20 sentences: narrative and facts around the opinions, which may come early or late.

    A third of the reviews open with one to four sentences of narrative before any opinion;
    a third are decided late (an unsure or contrary start, the verdict at the end); the rest
    mix opinions, facts and narrative in any order. Opinions of the other side (weight 1) occur.
    """
    rng = random.Random(f"sentiment-long:{classes}:{index}")
    domain = rng.choice(sorted(DOMAINS))
    d = DOMAINS[domain]
    target = rng.choice(LABELS[classes])
    sign = {"positive": 1, "negative": -1, "neutral": 0}[target]
    n = rng.randint(10, 20)
    filler = [(x, 0) for x in rng.sample(d["fact"], 4) + rng.sample(NARRATIVE, 12)]
    out: list[tuple[str, int]] = []
    if sign == 0:
        out = filler[: n - 2]
        out.insert(rng.randrange(len(out) + 1), (rng.choice([s for s, w in d["pos"] if w == 1]), 1))
        out.insert(rng.randrange(len(out) + 1), (rng.choice([s for s, w in d["neg"] if w == 1]), -1))
    else:
        side, other = ("pos", "neg") if sign > 0 else ("neg", "pos")
        shape = rng.random()
        mild_other = [(s, -sign) for s, w in d[other] if w == 1]
        if shape < 1 / 3:  # decided late
            out.append((rng.choice(OPENERS_UNSURE), 0))
            if rng.random() < 0.5:
                out.append(rng.choice(mild_other))
            out += filler[: n - len(out) - 2]
            s, w = rng.choice(d[side])
            out.append((s, sign * w))
            out.append((rng.choice(VERDICT[sign]), 3 * sign))
        else:
            k = rng.randint(2, 4)
            body = [(s, sign * w) for s, w in rng.sample(d[side], k)]
            if rng.random() < 0.5:
                body.append(rng.choice(mild_other))
            lead = rng.randint(1, 4) if shape < 2 / 3 else 0  # narrative before any opinion
            body += filler[lead : lead + max(0, n - lead - len(body) - 1)]
            rng.shuffle(body)
            out = filler[:lead] + body
            if rng.random() < 0.5:
                out.append((rng.choice(VERDICT[sign]), 3 * sign))
    total = sum(w for _, w in out)
    assert (total > 0) - (total < 0) == sign, (out, target)
    sentences = tuple(s for s, _ in out)
    return Review(" ".join(sentences), target, sentences, domain)


def shipped_file(split: str, classes: int = 2, length: str = "short") -> Path:
    """The shipped JSONL of a set (``tools/make_sentiment.py`` writes them), e.g.
    ``data/sentiment-long-binary-train.jsonl``.
    """
    prefix = "sentiment" if length == "short" else "sentiment-long"
    return (
        Path(__file__).parent.parent
        / "data"
        / f"{prefix}-{ {2: 'binary', 3: '3class'}[classes] }-{split}.jsonl"
    )


def split_of(text: str) -> str:
    """``test`` for a quarter of all distinct texts (by hash), ``train`` for the rest."""
    import hashlib

    return "test" if hashlib.sha256(text.encode()).digest()[0] % 4 == 0 else "train"


def sentiment_set(n: int, classes: int = 2, split: str = "train", length: str = "short") -> list[Review]:
    """The first ``n`` distinct reviews of ``split``: no duplicates, no text in both splits."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, not {split!r}")
    out: list[Review] = []
    seen: set[str] = set()
    for i in range(200 * n + 100):
        r = make_review(i, classes, length)
        if r.text in seen:
            continue
        seen.add(r.text)
        if split_of(r.text) == split:
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct {split} reviews, not {n}")
