"""User reward functions used by the tests (loaded as tests.user_rewards:NAME)."""


def length(completions, references, **kwargs):
    return [float(len(c)) for c in completions]


def fails_on_seven(completions, references, **kwargs):
    if any("7" in c for c in completions):
        raise ValueError("cannot score 7")
    return [0.0 for _ in completions]


def wrong_length(completions, references, **kwargs):
    return [0.0]
