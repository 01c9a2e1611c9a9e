"""Regenerate ``cscompile/data/prompts.jsonl``, the prompt set the project ships.

Five task families, ten prompts each. Code, math, summarization and dialogue prompts are
written here by hand. Long-context retrieval prompts plant one fact ("needle") at a chosen
depth inside 1-2k tokens of English prose taken from Python's ``pydoc_data.topics`` and ask
for it back; the generated text is stored in the jsonl, so the shipped set does not change
with the Python version. Run: ``python tools/make_prompts.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cscompile" / "data" / "prompts.jsonl"

CODE = [
    "Write a Python function `is_palindrome(s)` that ignores case and non-letters.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain what this code does:\n\n```python\ndef f(xs):\n    return [x for x in xs if x % 2 == 0]\n```",
    "Write a SQL query that returns the ten customers with the highest total order amount from tables customers(id, name) and orders(id, customer_id, amount).",
    "Fix the bug in this function:\n\n```python\ndef average(xs):\n    return sum(xs) / len(xs) + 1\n```",
    "Write a bash one-liner that counts the lines of every .py file in the current directory tree.",
    "Write a Python class `Stack` with push, pop and peek methods.",
    "What is the time complexity of binary search, and why?",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a Python function that reads a CSV file and returns the sum of its 'price' column.",
]
MATH = [
    "What is 17 times 23?",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
    "Solve for x: 3x + 7 = 22.",
    "What is 15% of 240?",
    "If a rectangle is 8 cm long and 5 cm wide, what are its area and perimeter?",
    "Anna has 12 apples. She gives a third of them to Ben and eats 2. How many are left?",
    "What is the sum of the integers from 1 to 100?",
    "Convert 0.375 to a fraction in lowest terms.",
    "A shirt costs $40 after a 20% discount. What was the original price?",
    "What is the square root of 144 plus the cube of 3?",
]
_PASSAGES = [
    "The city council met on Tuesday to discuss the new bicycle lanes. Residents complained that the lanes "
    "reduced parking, while cyclists said the lanes made their commute safer. The council agreed to study "
    "traffic data for three months before deciding whether to extend the lanes to the city centre.",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make glucose "
    "and oxygen. It takes place mainly in the leaves, inside chloroplasts that contain the green pigment "
    "chlorophyll. The oxygen released is what most animals breathe.",
    "The company reported record sales in the third quarter, driven by strong demand for its new laptop. "
    "However, profits fell slightly because of higher component costs. The chief executive said prices "
    "would remain stable for the rest of the year.",
    "Honey bees communicate the location of food through a 'waggle dance'. The angle of the dance relative "
    "to vertical shows the direction of the food relative to the sun, and the length of the waggle run "
    "shows the distance. Other bees follow the dancer and then fly to the food.",
    "A volcano erupted on the island early on Sunday, sending ash five kilometres into the sky. Flights "
    "were cancelled and about two thousand people were moved from nearby villages. No injuries were "
    "reported, and scientists expect the activity to decrease over the coming week.",
    "The library will extend its opening hours during exam season. From May 1 to June 15 it will open at "
    "7 a.m. and close at midnight on weekdays. Students must show their card after 9 p.m.",
    "Regular exercise improves heart health, strengthens muscles and bones, and helps control weight. "
    "Doctors recommend at least 150 minutes of moderate activity per week, such as brisk walking or "
    "cycling, together with two days of strength training.",
    "The museum's new exhibition presents two hundred years of maps, from hand-drawn sea charts to "
    "satellite images. Visitors can compare how the coastline was drawn in 1820 with how it looks today, "
    "and a workshop shows how maps are printed.",
    "The software update fixes a security flaw that let attackers read private messages. Users are "
    "advised to install it immediately. The update also improves battery life and adds a dark mode.",
    "Rain is expected across the region on Friday, with up to 40 mm in the hills. The weekend will be "
    "drier but colder, with frost possible on Sunday morning. Temperatures recover early next week.",
]
SUMMARIZATION = [f"Summarize the following text in one sentence.\n\n{p}" for p in _PASSAGES]
DIALOGUE = [
    [{"role": "user", "content": "Hi! Can you recommend a good book for a long flight?"}],
    [{"role": "user", "content": "I feel stressed about my exams. Any advice?"}],
    [
        {"role": "user", "content": "What's a good name for a golden retriever puppy?"},
        {"role": "assistant", "content": "How about Sunny, Maple or Biscuit?"},
        {"role": "user", "content": "I like Maple. Why did you suggest it?"},
    ],
    [{"role": "user", "content": "Tell me a short joke about computers."}],
    [{"role": "user", "content": "How do I politely decline a meeting invitation?"}],
    [
        {"role": "user", "content": "I'm planning a picnic on Saturday."},
        {"role": "assistant", "content": "That sounds lovely! Where are you going?"},
        {"role": "user", "content": "To the park by the lake. What should I bring?"},
    ],
    [{"role": "user", "content": "What's the difference between weather and climate?"}],
    [{"role": "user", "content": "Can you help me write a thank-you note to my teacher?"}],
    [{"role": "user", "content": "What are three easy plants to keep indoors?"}],
    [
        {"role": "user", "content": "I want to learn to cook."},
        {"role": "assistant", "content": "Great idea! What kind of food do you enjoy?"},
        {"role": "user", "content": "Italian food. What should I make first?"},
    ],
]
NEEDLES = [
    ("The secret code for the blue vault is 4721.", "What is the secret code for the blue vault?", "4721"),
    ("Maria's favourite city is Lisbon.", "What is Maria's favourite city?", "Lisbon"),
    (
        "The meeting with the auditors is on Thursday at 3 p.m.",
        "When is the meeting with the auditors?",
        "Thursday",
    ),
    (
        "The password for the guest network is ORCHID-58.",
        "What is the password for the guest network?",
        "ORCHID-58",
    ),
    ("The red box contains seven silver keys.", "How many silver keys does the red box contain?", "seven"),
    ("Dr. Okafor's office is in room 312.", "In which room is Dr. Okafor's office?", "312"),
    ("The ship's captain is named Elena Varga.", "What is the name of the ship's captain?", "Elena Varga"),
    (
        "The festival this year will be held in Galway.",
        "Where will the festival be held this year?",
        "Galway",
    ),
    ("The launch code word is NIGHTINGALE.", "What is the launch code word?", "NIGHTINGALE"),
    ("Tom's bicycle is painted bright orange.", "What colour is Tom's bicycle?", "orange"),
]


def _filler_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 900 and ">>>" not in para and "::" not in para:
                paras.append(para)
    return paras


def retrieval_prompts() -> list[dict[str, object]]:
    rng = random.Random(20261123)
    paras = _filler_paragraphs()
    out = []
    for i, (fact, question, answer) in enumerate(NEEDLES):
        n_chars = rng.randint(5000, 8500)  # ~1.2k-2k tokens of prose
        chosen: list[str] = []
        while sum(len(p) for p in chosen) < n_chars:
            chosen.append(paras[rng.randrange(len(paras))])
        depth = [0.1, 0.3, 0.5, 0.7, 0.9][i % 5]
        chosen.insert(int(len(chosen) * depth), fact)
        context = "\n\n".join(chosen)
        prompt = (
            "Read the document below and answer the question with a short answer.\n\n"
            f"Document:\n{context}\n\nQuestion: {question}"
        )
        out.append({"prompt": prompt, "answer": answer, "needle_depth": depth})
    return out


def main() -> None:
    rows: list[dict[str, object]] = []
    for family, items in (("code", CODE), ("math", MATH), ("summarization", SUMMARIZATION)):
        rows += [
            {"family": family, "id": f"{family}-{i:02d}", "messages": [{"role": "user", "content": p}]}
            for i, p in enumerate(items)
        ]
    rows += [{"family": "dialogue", "id": f"dialogue-{i:02d}", "messages": m} for i, m in enumerate(DIALOGUE)]
    for i, r in enumerate(retrieval_prompts()):
        rows.append(
            {
                "family": "retrieval",
                "id": f"retrieval-{i:02d}",
                "messages": [{"role": "user", "content": r["prompt"]}],
                "answer": r["answer"],
                "needle_depth": r["needle_depth"],
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {OUT}")


if __name__ == "__main__":
    main()
