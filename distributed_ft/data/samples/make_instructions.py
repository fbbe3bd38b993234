"""Write the small instruction-tuning sample set (``instructions/{train,validation,test}.jsonl``).

Ten task families with fixed templates and hand-written word lists (arithmetic, capitals, opposites,
plurals, spelling backwards, sorting, counting words, parity, upper-casing, days of the week). It is
synthetic: it shows that fine-tuning adapts a model to a response style (perplexity on held-out prompts
of the same families drops), not that the model gets generally better. Deterministic: rerunning it
rewrites the same files. Run: ``python distributed_ft/data/samples/make_instructions.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Hungary": "Budapest", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Australia": "Canberra", "India": "New Delhi", "China": "Beijing",
    "Russia": "Moscow", "Turkey": "Ankara", "Morocco": "Rabat", "Ghana": "Accra", "Cuba": "Havana",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "tall": "short", "fast": "slow", "happy": "sad", "early": "late", "open": "closed",
    "light": "dark", "full": "empty", "strong": "weak", "rich": "poor", "loud": "quiet", "hard": "soft",
    "young": "old", "wet": "dry", "clean": "dirty", "first": "last", "thick": "thin", "wide": "narrow",
    "above": "below", "inside": "outside", "push": "pull", "win": "lose", "buy": "sell", "true": "false",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "tooth": "teeth", "foot": "feet", "person": "people",
    "leaf": "leaves", "knife": "knives", "city": "cities", "box": "boxes", "bus": "buses",
    "woman": "women", "goose": "geese", "cactus": "cacti", "baby": "babies", "wolf": "wolves",
    "potato": "potatoes", "sheep": "sheep", "fish": "fish", "church": "churches", "party": "parties",
}  # fmt: skip
WORDS = [
    "garden", "river", "window", "planet", "silver", "orange", "pencil", "monkey", "bridge", "castle",
    "rocket", "yellow", "summer", "dragon", "forest", "candle", "basket", "jacket", "market", "ticket",
    "travel", "number", "flower", "button",
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SENTENCES = [
    "the cat sat on the warm mat",
    "we walked to the old market",
    "rain fell all night long",
    "my brother plays the piano every evening",
    "birds sing early in the morning",
    "the train to the city was late again",
    "she reads a new book every week",
    "a small boat crossed the quiet lake",
    "they built a house near the river",
    "coffee tastes better with a little milk",
]


def _examples(rng: random.Random) -> list[dict[str, str]]:
    """Every family's examples, in a fixed order (shuffled by the caller)."""
    out = []

    def add(prompt: str, response: str) -> None:
        out.append({"prompt": prompt, "response": response})

    for _ in range(40):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if rng.random() < 0.5:
            add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
        else:
            a, b = max(a, b), min(a, b)
            add(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.")
    for country, capital in CAPITALS.items():
        add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
    for word, opposite in OPPOSITES.items():
        add(f"Give the opposite of the word '{word}'.", f"The opposite of '{word}' is '{opposite}'.")
    for word, plural in PLURALS.items():
        add(f"What is the plural of '{word}'?", f"The plural of '{word}' is '{plural}'.")
    for word in WORDS:
        add(f"Spell the word '{word}' backwards.", f"Spelled backwards, '{word}' is '{word[::-1]}'.")
    for _ in range(25):
        numbers = rng.sample(range(1, 60), rng.randint(3, 6))
        shown = ", ".join(map(str, numbers))
        add(
            f"Sort these numbers from smallest to largest: {shown}",
            ", ".join(map(str, sorted(numbers))) + ".",
        )
    for sentence in SENTENCES:
        add(
            f'How many words are in this sentence: "{sentence}"?',
            f"The sentence has {len(sentence.split())} words.",
        )
        add(f"Rewrite in capital letters: {sentence}", sentence.upper())
    for _ in range(30):
        n = rng.randint(1, 500)
        add(f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}.")
    for i, day in enumerate(DAYS):
        add(f"Which day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}.")
        add(f"Which day comes before {day}?", f"The day before {day} is {DAYS[i - 1]}.")
    return out


def main() -> None:
    """Shuffle with a fixed seed and write 30 validation, 30 test and the rest as training examples."""
    rng = random.Random(2026)
    examples = _examples(rng)
    rng.shuffle(examples)
    folder = Path(__file__).parent / "instructions"
    folder.mkdir(exist_ok=True)
    splits = {"validation": examples[:30], "test": examples[30:60], "train": examples[60:]}
    for split, rows in splits.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{split}: {len(rows)} examples")


if __name__ == "__main__":
    main()
