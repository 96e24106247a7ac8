"""The external rollout engines (vLLM colocated and as a server); grpo/rollout/__init__.py lists the modules."""
