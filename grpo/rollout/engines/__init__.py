"""The rollout engines outside the training process: vLLM (colocated and as a server) and our decoder's rollout
process; grpo/rollout/__init__.py lists the modules."""
