"""A user loss for the tests: the normal GRPO loss, except non-finite at the step named by GRPO_TEST_NAN_STEP."""

import os

from grpo.loss import policy_loss

calls = {"n": 0}


def nan_on_second_step(logps, *args, **kwargs):
    loss, stats = policy_loss(logps, *args, **{**kwargs, "loss_type": "grpo"})  # ours is the dotted name
    calls["n"] += 1
    if calls["n"] == int(os.environ.get("GRPO_TEST_NAN_STEP", "2")):
        loss = loss * float("nan")
    return loss, stats


seen_weights = []
seen_options = []
OPTIONAL = ("token_mask", "token_weights", "kl_estimator", "delta")


def records_token_weights(logps, *args, token_weights=None, **kwargs):
    """The GRPO loss; keeps each call's token_weights (None when the trainer passed none) and which optional
    keyword arguments the trainer passed."""
    seen_weights.append(token_weights)
    seen_options.append({k: kwargs[k] for k in OPTIONAL if k in kwargs})
    return policy_loss(logps, *args, **{**kwargs, "loss_type": "grpo", "token_weights": token_weights})
