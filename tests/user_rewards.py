"""User reward functions used by the tests (loaded as tests.user_rewards:NAME)."""


def length(completions, references, **kwargs):
    return [float(len(c)) for c in completions]


def fails_on_seven(completions, references, **kwargs):
    if any("7" in c for c in completions):
        raise ValueError("cannot score 7")
    return [0.0 for _ in completions]


def wrong_length(completions, references, **kwargs):
    return [0.0]


def text_code_if_even_answer(completions, references, **kwargs):
    """A reward that varies between samples only for prompts with an even answer (the rest: all 0)."""
    import zlib

    return [
        float(zlib.crc32(c.encode()) % 1000) if int(r.split()[-1]) % 2 == 0 else 0.0
        for c, r in zip(completions, references)
    ]


def constant(completions, references, **kwargs):
    return [1.0 for _ in completions]


def correctness(completions, references, **kwargs):
    """Counts as the template's correctness reward (eval accuracy): 2.0 for two thirds of all texts (by hash)."""
    import zlib

    return [2.0 if zlib.crc32(c.encode()) % 3 != 0 else 0.0 for c in completions]


def slow_length(completions, references, *, seconds: float = 0.0, **kwargs):
    """length, after a pause: a step long enough to catch a run in the middle of one."""
    import time

    time.sleep(seconds)
    return length(completions, references)
