"""A user loss for the tests: the normal GRPO loss, except non-finite at the step named by GRPO_TEST_NAN_STEP."""

import os

from grpo.loss import policy_loss, reduced_by

calls = {"n": 0}


@reduced_by("sequence_mean")
def nan_on_second_step(logps, *args, **kwargs):
    loss, stats = policy_loss(logps, *args, **{**kwargs, "loss_type": "grpo"})  # ours is the dotted name
    calls["n"] += 1
    if calls["n"] == int(os.environ.get("GRPO_TEST_NAN_STEP", "2")):
        loss = loss * float("nan")
    return loss, stats


seen_weights = []
seen_options = []
OPTIONAL = ("token_mask", "token_weights", "kl_estimator", "delta")


@reduced_by("sequence_mean")
def records_token_weights(logps, *args, token_weights=None, **kwargs):
    """The GRPO loss; keeps each call's token_weights (None when the trainer passed none) and which optional
    keyword arguments the trainer passed."""
    seen_weights.append(token_weights)
    seen_options.append({k: kwargs[k] for k in OPTIONAL if k in kwargs})
    return policy_loss(logps, *args, **{**kwargs, "loss_type": "grpo", "token_weights": token_weights})


# REINFORCE with the group advantage, one user loss per reduction: per-token terms the trainer reduces.
def _reinforce(reduction):
    @reduced_by(reduction)
    def loss(logps, old_logps, ref_logps, advantages, mask, **settings):
        return -advantages.unsqueeze(-1) * logps, {}  # [B, T]; the trainer masks and reduces

    return loss


terms_sequence_mean = _reinforce("sequence_mean")
terms_batch_token_mean = _reinforce("batch_token_mean")
terms_constant = _reinforce("constant")
terms_global_token_mean = _reinforce("global_token_mean")


@reduced_by("global_token_mean")
def scalar_global_token_mean(
    logps, old_logps, ref_logps, advantages, mask, *, num_items_in_batch, **settings
):
    """dapo's normalisation written by hand: a scalar over the micro-batch it is handed, divided by the token
    count of the whole update on every rank."""
    return (-advantages.unsqueeze(-1) * logps * mask).sum() / num_items_in_batch, {}


@reduced_by("sequence_mean")
def wrong_signature(logps, advantages):
    """Takes two arguments where the trainer passes five and keyword settings: refused before any model loads."""
    return (logps * advantages[:, None]).mean(), {}
