"""The built-in tasks (`dataset.path: builtin:arithmetic`, `builtin:multiply`): rows generated from a seed per
split, so a run needs no download and the held-out problems never appear in training."""

from __future__ import annotations

import random
from typing import Any

BUILTIN_SIZES = {"train": 5000, "test": 500}
# Different seeds per split keep held-out problems out of the training stream.
BUILTIN_SEEDS = {"train": 1234, "test": 98765}

_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "coins", "books"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
_ADD = [
    "{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?",
    "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
    "{n} found {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {n} find?",
    "What is {a} + {b}?",
]
_SUB = [
    "{n} has {a} {item} and gives away {b}. How many {item} are left?",
    "A jar holds {a} {item}. {n} takes out {b}. How many {item} stay in the jar?",
    "What is {a} - {b}?",
]


def builtin_arithmetic(split: str, size: int | None = None) -> list[dict[str, Any]]:
    """Small word problems with one-digit operands: easy enough that a 135M model sometimes succeeds."""
    seed = BUILTIN_SEEDS.get(split, abs(hash(split)) % 10**6)
    rng = random.Random(seed)
    rows = []
    for _ in range(size or BUILTIN_SIZES.get(split, 500)):
        a, b, n, item = rng.randint(1, 9), rng.randint(1, 9), rng.choice(_NAMES), rng.choice(_ITEMS)
        if rng.random() < 0.6:
            question, result, op = rng.choice(_ADD).format(a=a, b=b, n=n, item=item), a + b, "+"
        else:
            a, b = max(a, b), min(a, b)
            question, result, op = rng.choice(_SUB).format(a=a, b=b, n=n, item=item), a - b, "-"
        rows.append({"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}"})
    return rows


def builtin_multiply(split: str, size: int | None = None) -> list[dict[str, Any]]:
    """3-digit x 2-digit products: beyond a 135M model's mental arithmetic, easy with the calculator tool."""
    rng = random.Random(BUILTIN_SEEDS.get(split, abs(hash(split)) % 10**6) + 7)
    rows = []
    for _ in range(size or BUILTIN_SIZES.get(split, 500)):
        a, b = rng.randint(100, 999), rng.randint(10, 99)
        rows.append({"question": f"What is {a} * {b}?", "answer": f"{a} * {b} = {a * b}\n#### {a * b}"})
    return rows


BUILTIN_TASKS = {"builtin:arithmetic": builtin_arithmetic, "builtin:multiply": builtin_multiply}
