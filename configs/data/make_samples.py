"""Write the small sample files the recipe configs use under ``runlocal``.

They have the columns of the real datasets (E2E NLG, Alpaca, SST-2), so a recipe's column
mapping is the same offline and online; only ``data.path`` changes. The rows are made here
from templates (deterministic), not copied from the datasets.

    python configs/data/make_samples.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).parent

NAMES = ["The Eagle", "Green Man", "The Mill", "Alimentum", "Blue Spice", "Cotto", "Zizzi"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese"]
PRICES = ["cheap", "moderate", "high"]
AREAS = ["city centre", "riverside"]
TYPES = ["coffee shop", "pub", "restaurant"]


def e2e_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        name, food, price = rng.choice(NAMES), rng.choice(FOODS), rng.choice(PRICES)
        area, kind = rng.choice(AREAS), rng.choice(TYPES)
        mr = f"name[{name}], eatType[{kind}], food[{food}], priceRange[{price}], area[{area}]"
        ref = rng.choice(
            [
                f"{name} is a {price} {food} {kind} in the {area}.",
                f"In the {area} there is a {kind} called {name} serving {price} {food} food.",
                f"{name} serves {food} food at {price} prices. It is a {kind} in the {area}.",
            ]
        )
        rows.append({"meaning_representation": mr, "human_reference": ref})
    return rows


def alpaca_rows(rng: random.Random) -> list[dict]:
    rows = []
    for a, b in itertools.product(range(2, 9), range(3, 7)):
        rows.append(
            {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a + b}"}
        )
    for word in ["cat", "house", "river", "green", "music", "light", "stone", "apple"]:
        rows.append(
            {
                "instruction": f"Spell the word '{word}' backwards.",
                "input": "",
                "output": word[::-1],
            }
        )
        rows.append(
            {
                "instruction": "Give the number of letters in the word.",
                "input": word,
                "output": str(len(word)),
            }
        )
    rng.shuffle(rows)
    return rows


def sst2_rows(rng: random.Random) -> list[dict]:
    good = ["wonderful", "moving", "funny", "beautiful", "sharp", "charming", "brilliant"]
    bad = ["dull", "tedious", "clumsy", "boring", "shallow", "messy", "lifeless"]
    things = ["film", "story", "performance", "script", "movie", "cast"]
    rows = []
    for i, (word, thing) in enumerate(itertools.product(good + bad, things)):
        label = int(word in good)
        frame = rng.choice(["a {w} {t}", "the {t} is {w}", "an utterly {w} {t} .", "{w} and {w}"])
        rows.append({"idx": i, "sentence": frame.format(w=word, t=thing), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(0)
    write_jsonl(HERE / "e2e_sample.jsonl", e2e_rows(96, rng))
    (HERE / "alpaca_sample.json").write_text(json.dumps(alpaca_rows(rng), indent=1))
    write_jsonl(HERE / "sst2_sample.jsonl", sst2_rows(rng))


if __name__ == "__main__":
    main()
