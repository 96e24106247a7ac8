"""Rollouts of several turns: tools, environments, and the worker process user code runs in;
grpo/rollout/__init__.py lists the modules."""
